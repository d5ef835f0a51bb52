//! HTTP errors in OpenAI's body shape, and the one place where errors of
//! the pipeline are mapped to HTTP statuses.
//!
//! ```json
//! {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": 400}}
//! ```
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: u16,
}

impl ApiError {
    /// 400: the request is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: None,
        }
    }

    /// 400 naming the field at fault.
    pub fn bad_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::bad_request(message)
        }
    }

    /// 404: no such route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            param: None,
        }
    }

    /// 404 naming the `model` field: the model is not served here.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self {
            param: Some("model".to_owned()),
            ..Self::not_found(message)
        }
    }

    /// 500: the server failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
        }
    }

    /// 429: the pipeline holds as many requests as it may; answered with
    /// `Retry-After`.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: message.into(),
            param: None,
        }
    }

    /// 401: no or a wrong API key.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "Unauthorized: send the server's API key as `Authorization: Bearer <key>`"
                .to_owned(),
            param: None,
        }
    }

    /// 503: the server is shutting down.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
        }
    }

    /// OpenAI's `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status {
            // vLLM's spelling (OpenAI's own is `not_found_error`).
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner {
                message: &self.message,
                kind: self.kind(),
                param: self.param.as_deref(),
                code: self.status.as_u16(),
            },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = %self.status, message = %self.message, "request refused");
        }
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // Requests in flight finish in seconds; a client retries then.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// The mapping of pipeline errors to statuses, by [`omni_core::ErrorKind`]:
/// the caller's input → 400; a stage that failed on an accepted request →
/// 500 naming the stage; a pipeline that cannot serve (a dead stage) → 503;
/// anything else → 500. Nothing that happens inside the pipeline after a
/// request was accepted is reported as the client's fault.
impl From<omni_core::Error> for ApiError {
    fn from(e: omni_core::Error) -> Self {
        use omni_core::ErrorKind;
        let message = e.to_string();
        let named = |message: String| match e.stage_id() {
            Some(stage_id) if !message.contains("stage") => {
                format!("stage {stage_id} failed: {message}")
            }
            _ => message,
        };
        match e.kind() {
            ErrorKind::InvalidInput => Self::bad_request(message),
            ErrorKind::Unavailable => Self::unavailable(named(message)),
            ErrorKind::Overloaded => Self::overloaded(message),
            _ => Self::internal(named(message)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() -> Result<(), Box<dyn std::error::Error>> {
        let e = ApiError::bad_param("max_tokens", "max_tokens 0 must be at least 1");
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "max_tokens");
        assert_eq!(body["error"]["code"], 400);
        assert_eq!(body["error"]["message"], "max_tokens 0 must be at least 1");
        Ok(())
    }

    #[test]
    fn caller_errors_are_400_and_names_the_value() {
        let e = ApiError::from(omni_core::Error::UnknownStage {
            stage_id: 7,
            num_stages: 2,
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains('7'), "{}", e.message);
        let e = ApiError::from(omni_core::Error::SamplingParamsCount {
            expected: 2,
            got: 3,
        });
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn stage_failures_are_500_and_dead_stages_503_never_400() {
        let failed = ApiError::from(omni_core::Error::Runtime(omni_runtime_error_stage()));
        assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(failed.message.contains("stage 1"), "{}", failed.message);
        let dead = ApiError::from(omni_core::Error::Runtime(
            omni_core::runtime::Error::StageDied {
                stage_id: 1,
                status: "signal 9".into(),
            },
        ));
        assert_eq!(dead.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(dead.message.contains("stage 1"), "{}", dead.message);
    }

    fn omni_runtime_error_stage() -> omni_core::runtime::Error {
        omni_core::runtime::Error::Stage {
            stage_id: 1,
            message: "request `r`: input processor failed".into(),
        }
    }

    #[test]
    fn incomplete_request_is_a_server_error_naming_the_stage() {
        let e = ApiError::from(omni_core::Error::Incomplete {
            request_id: "r".into(),
            stage_id: 1,
        });
        assert!(e.status.is_server_error());
        assert!(e.message.contains("stage 1"), "{}", e.message);
        assert_eq!(e.body()["error"]["type"], "server_error");
    }
}
