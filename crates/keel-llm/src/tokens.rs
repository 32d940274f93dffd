//! Token counting for when a provider reports no usage: a real BPE tokenizer (OpenAI's
//! o200k_base, embedded in the binary — nothing is downloaded), so estimated usage rows
//! are close to what a provider would bill. Rows built from these counts are marked
//! `estimated`.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a count has loaded the tables.
static READY: AtomicBool = AtomicBool::new(false);

/// Texts at most this long take a few microseconds to count once the tables are loaded:
/// short enough to count on an async thread (see [`ready`]).
pub const INLINE_BYTES: usize = 1024;

/// Tokens in `text` under o200k_base.
#[must_use]
pub fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let n = tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as u64;
    READY.store(true, Ordering::Relaxed);
    n
}

/// Whether the tables are loaded: until then a count may take a tenth of a second (it
/// loads them) and belongs on a blocking thread; after, one of at most [`INLINE_BYTES`]
/// does not.
#[must_use]
pub fn ready() -> bool {
    READY.load(Ordering::Relaxed)
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
