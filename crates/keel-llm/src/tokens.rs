//! Token counting for when a provider reports no usage: a real BPE tokenizer (OpenAI's
//! o200k_base, embedded in the binary — nothing is downloaded), so estimated usage rows
//! are close to what a provider would bill. Rows built from these counts are marked
//! `estimated`.

/// Tokens in `text` under o200k_base.
#[must_use]
pub fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64
}

/// Loads the tokenizer's tables now (about a tenth of a second, and ~47 MB of memory).
/// Keel does not call it at start-up: the tables load on the first count, which always
/// runs on a blocking thread, so a gateway whose providers report usage never pays the
/// memory.
pub fn warm() {
    let _ = count("warm");
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_bpe_tokens_not_words() {
        assert_eq!(super::count(""), 0);
        assert_eq!(super::count("hello"), 1);
        let sentence = super::count("The quick brown fox jumps over the lazy dog.");
        assert!((9..=11).contains(&sentence), "{sentence}");
        assert!(
            super::count("antidisestablishmentarianism") > 1,
            "one word, several tokens"
        );
    }
}
