//! Engine errors as gRPC statuses, in one place, so every service answers the same failure
//! with the same code.

use eagle_engine::EngineError;
use tonic::{Code, Status};

/// The status for an engine error: bad requests are `INVALID_ARGUMENT`, bad model or head
/// files `FAILED_PRECONDITION`, a broken tensor-parallel group `UNAVAILABLE`, anything from the
/// tensor backend `INTERNAL`.
pub fn from_engine(e: &EngineError) -> Status {
    let code = match e {
        EngineError::InvalidRequest(_)
        | EngineError::ContextOverflow { .. }
        | EngineError::Tokenizer(_)
        | EngineError::ChatTemplate(_) => Code::InvalidArgument,
        EngineError::Io { .. }
        | EngineError::Malformed { .. }
        | EngineError::MissingFile { .. }
        | EngineError::Shape { .. }
        | EngineError::MissingTensor { .. }
        | EngineError::UnsupportedArch(_)
        | EngineError::Config(_) => Code::FailedPrecondition,
        EngineError::Collective(_) => Code::Unavailable,
        EngineError::Candle(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

pub fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}

/// A session the service does not hold (never opened, released, or reclaimed after idling).
pub fn unknown_session(id: &str) -> Status {
    Status::not_found(format!(
        "no session {id:?} (never opened, released, or idle too long)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let bad = EngineError::InvalidRequest("the prompt is empty".into());
        assert_eq!(from_engine(&bad).code(), Code::InvalidArgument);
        assert!(from_engine(&bad).message().contains("prompt is empty"));
        let over = EngineError::ContextOverflow {
            needed: 10,
            limit: 5,
        };
        assert_eq!(from_engine(&over).code(), Code::InvalidArgument);
        let file = EngineError::malformed("/h/model.safetensors", "truncated");
        assert_eq!(from_engine(&file).code(), Code::FailedPrecondition);
    }
}
