//! Errors as HTTP clients read them: a status code from the gRPC code the
//! same failure has on the gRPC API, and a JSON body naming the field at
//! fault. The body carries both shapes clients look for: OpenAI's
//! `{"error": {"message", "type", "param", "code"}}` and AUTOMATIC1111's
//! (FastAPI's) `{"detail": "..."}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

/// One failed HTTP request.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpError {
    pub status: StatusCode,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub message: String,
}

pub type HttpResult<T> = Result<T, HttpError>;

impl HttpError {
    /// 400, naming the field.
    pub fn invalid(param: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let param = param.into();
        HttpError {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {message}"),
            param: Some(param),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        HttpError {
            status: StatusCode::NOT_FOUND,
            param: None,
            message: message.into(),
        }
    }

    /// Name the field as this door's clients know it (`renames`: gRPC
    /// field → this API's field).
    pub fn renamed(mut self, renames: &[(&str, &str)]) -> Self {
        if let Some(p) = &self.param {
            if let Some((_, to)) = renames.iter().find(|(from, _)| from == p) {
                self.param = Some((*to).to_string());
            }
        }
        self
    }

    /// The field named as a part of the object at `prefix` (`prefix.field`).
    pub fn within(mut self, prefix: &str) -> Self {
        if let Some(p) = &self.param {
            let named = format!("{prefix}.{p}");
            self.message = self.message.replacen(p.as_str(), &named, 1);
            self.param = Some(named);
        }
        self
    }

    /// OpenAI's `type` for this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_FOUND => {
                "invalid_request_error"
            }
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            _ => "server_error",
        }
    }
}

/// HTTP status for a gRPC code, as the two APIs pair them.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        // nginx's "client closed request": nobody reads it.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<tonic::Status> for HttpError {
    fn from(s: tonic::Status) -> Self {
        let param = sd_proto::status::field_violations(&s)
            .into_iter()
            .next()
            .map(|v| v.field);
        HttpError {
            status: http_status(s.code()),
            param,
            message: s.message().to_string(),
        }
    }
}

impl From<crate::error::Error> for HttpError {
    fn from(e: crate::error::Error) -> Self {
        tonic::Status::from(e).into()
    }
}

/// Seconds a client told 429 or 503 should wait before it retries.
const RETRY_AFTER_SECONDS: &str = "1";

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            },
            "detail": self.message,
        });
        let mut r = (self.status, axum::Json(body)).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            r.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        for (code, status) in [
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::NotFound, 404),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
        ] {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn an_invalid_field_is_named_from_the_status_details() {
        let e = HttpError::from(crate::error::Error::invalid(
            "width",
            "7 is not a multiple of 8",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("width"));
        assert_eq!(e.message, "width: 7 is not a multiple of 8");
        let e = e.renamed(&[("height", "size"), ("width", "size")]);
        assert_eq!(e.param.as_deref(), Some("size"));
    }

    #[test]
    fn overload_says_when_to_retry() {
        let r = HttpError::from(tonic::Status::resource_exhausted("queue full")).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
