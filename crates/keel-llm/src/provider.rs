//! The provider trait: one implementation per wire protocol (`providers/`), all speaking
//! the OpenAI-shaped types in [`crate::types`] to the router.

use std::pin::Pin;

use futures_util::Stream;

use crate::error::ErrorKind;
use crate::error::ProviderError;
use crate::types::{ChatChunk, ChatRequest, ChatResponse, EmbeddingsRequest, EmbeddingsResponse};

/// A stream of answer chunks. An `Err` item ends it: the upstream failed mid-way.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, ProviderError>> + Send>>;

/// One upstream model endpoint.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// A whole answer.
    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError>;

    /// A streamed answer. Returns once the first chunk has arrived, so a failure before
    /// the first token is an `Err` here (and the router may fall back), while a failure
    /// after it is an `Err` item in the stream.
    async fn chat_stream(&self, request: &ChatRequest) -> Result<ChunkStream, ProviderError>;

    /// Embeddings. Providers without an embeddings API keep this default, a caller error.
    async fn embeddings(
        &self,
        _request: &EmbeddingsRequest,
    ) -> Result<EmbeddingsResponse, ProviderError> {
        Err(ProviderError::new(
            ErrorKind::Client,
            "this model's provider has no embeddings API",
        ))
    }
}
