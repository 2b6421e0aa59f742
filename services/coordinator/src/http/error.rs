//! Errors of the HTTP API as OpenAI's error object, `{"error": {"message", "type", "param",
//! "code"}}`, with the HTTP status that goes with it.
//!
//! Invariant: every failure reaches the client through [`ApiError::from_status`], the one map
//! from the gRPC code the shared validation and step loop give to an HTTP status; the HTTP
//! layer's own checks name the OpenAI parameter at fault in `param`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::{Code, Status};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The OpenAI parameter at fault, when one is.
    pub param: Option<String>,
}

/// The gRPC field names the shared validation uses, and the HTTP API's names for them.
const PARAM_NAMES: &[(&str, &str)] = &[
    ("max_new_tokens", "max_tokens"),
    ("session_id", "eagle.session_id"),
    ("total_token", "eagle.total_token"),
    ("depth", "eagle.depth"),
    ("messages", "messages"),
    ("prompt", "prompt"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("stop", "stop"),
];

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// 400 for a parameter the HTTP layer refuses.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// An error of the shared validation or of the step loop. Its message is written with the
    /// gRPC API's field names; they are renamed to the HTTP API's, and the first of
    /// [`PARAM_NAMES`] it mentions is the `param`.
    /// The gRPC code a refusal with this HTTP status corresponds to (for the metrics, which
    /// count gRPC and HTTP requests alike).
    pub fn grpc_code(&self) -> Code {
        match self.status.as_u16() {
            400 | 413 | 415 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::Aborted,
            429 => Code::ResourceExhausted,
            499 => Code::Cancelled,
            501 => Code::Unimplemented,
            503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Internal,
        }
    }

    pub fn from_status(s: &Status) -> Self {
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            // 499: nginx's "client closed request"; nobody is left to read it.
            Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut message = s.message().to_string();
        let mut param = None;
        if status == StatusCode::BAD_REQUEST {
            let first = PARAM_NAMES.iter().find(|(grpc, _)| message.contains(grpc));
            param = first.map(|(_, http)| http.to_string());
            for (grpc, http) in PARAM_NAMES.iter().filter(|(g, h)| g != h) {
                message = message.replace(grpc, http);
            }
        }
        ApiError {
            status,
            message,
            param,
        }
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 404 | 405 | 409 | 413 | 415 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            503 | 504 => "service_unavailable_error",
            _ => "server_error",
        }
    }

    /// A short machine-readable `code`.
    fn code(&self) -> Option<&'static str> {
        match self.status.as_u16() {
            404 if self.param.as_deref() == Some("model") => Some("model_not_found"),
            404 => Some("not_found"),
            409 => Some("session_busy"),
            413 => Some("request_too_large"),
            401 => Some("invalid_api_key"),
            429 => Some("rate_limit_exceeded"),
            503 => Some("no_worker"),
            _ if self.param.is_some() => Some("invalid_parameter"),
            _ => None,
        }
    }

    /// The error object, as sent in a body or as a streamed event.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        let cases = [
            (Code::InvalidArgument, 400),
            (Code::NotFound, 404),
            (Code::Aborted, 409),
            (Code::ResourceExhausted, 429),
            (Code::Unauthenticated, 401),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
        ];
        for (code, http) in cases {
            let e = ApiError::from_status(&Status::new(code, "x"));
            assert_eq!(e.status.as_u16(), http, "{code:?}");
            assert!(e.body()["error"]["message"].is_string());
        }
    }

    #[test]
    fn validation_messages_use_the_http_names() {
        let s = Status::invalid_argument(
            "the prompt (9 tokens) plus max_new_tokens (99999) exceeds the model's context",
        );
        let e = ApiError::from_status(&s);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains("max_tokens (99999)"), "{}", e.message);
        let e = ApiError::from_status(&Status::invalid_argument(
            "max_new_tokens must be at least 1",
        ));
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        assert_eq!(e.body()["error"]["code"], "invalid_parameter");
    }
}
