//! The one place where failures become Matrix errors (`errcode` + HTTP status).
//!
//! Everything below the HTTP layer returns [`Error`]; handlers never build error bodies by hand.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure as a client or a peer server sees it.
#[derive(Debug)]
pub struct MatrixError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    /// Extra top-level fields merged into the body (`retry_after_ms`, UIA `flows`, ...).
    pub extra: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {}", .0.errcode, .0.message)]
    Matrix(Box<MatrixError>),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn matrix(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Error::Matrix(Box::new(MatrixError { status, errcode, message: message.into(), extra: None }))
    }

    /// Adds a top-level field to the error body.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        if let Error::Matrix(m) = &mut self {
            m.extra.get_or_insert_with(Default::default).insert(key.to_owned(), value);
        }
        self
    }

    pub fn errcode(&self) -> &'static str {
        match self {
            Error::Matrix(m) => m.errcode,
            Error::Internal(_) => "M_UNKNOWN",
        }
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::FORBIDDEN, "M_FORBIDDEN", msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::NOT_FOUND, "M_NOT_FOUND", msg)
    }
    pub fn bad_json(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_BAD_JSON", msg)
    }
    pub fn not_json(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_NOT_JSON", msg)
    }
    pub fn invalid_param(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", msg)
    }
    pub fn missing_param(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", msg)
    }
    pub fn unrecognized(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", msg)
    }
    pub fn method_not_allowed() -> Self {
        Self::matrix(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "method not allowed on this endpoint")
    }
    pub fn missing_token() -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "missing access token")
    }
    pub fn unknown_token() -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "unknown or expired access token")
            .with("soft_logout", json!(false))
    }
    pub fn too_large(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", msg)
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::matrix(StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED", "too many requests")
            .with("retry_after_ms", json!(retry_after_ms))
    }
    pub fn user_in_use() -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "user id already taken")
    }
    pub fn invalid_username(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", msg)
    }
    pub fn unsupported_room_version(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION", msg)
    }
    pub fn room_in_use(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_ROOM_IN_USE", msg)
    }
    pub fn unknown(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_UNKNOWN", msg)
    }
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", msg)
    }
    pub fn invalid_signature(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE", msg)
    }
    /// 405 for account data types the server manages (the spec pairs the status with `M_BAD_JSON`).
    pub fn server_managed(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON", msg)
    }
    /// Media created for an async upload whose content has not arrived (within the client's `timeout_ms`).
    pub fn not_yet_uploaded() -> Self {
        Self::matrix(StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED", "the media has not been uploaded yet")
    }
    /// An async-upload target that already has its content.
    pub fn cannot_overwrite_media() -> Self {
        Self::matrix(StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA", "the media already has content")
    }
    /// A per-user limit (media quota) reached.
    pub fn resource_limit(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::FORBIDDEN, "M_RESOURCE_LIMIT_EXCEEDED", msg)
    }
    /// A remote server could not give us what a client asked for (media fetch failures).
    pub fn bad_gateway(msg: impl Into<String>) -> Self {
        Self::matrix(StatusCode::BAD_GATEWAY, "M_UNKNOWN", msg)
    }
    /// Keys sent to a key-backup version that is not the current one.
    pub fn wrong_room_keys_version(current_version: String) -> Self {
        Self::matrix(StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION", "that backup version is not the current one")
            .with("current_version", json!(current_version))
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(anyhow::anyhow!(msg.into()))
    }
}

/// A write that failed because the file system is full (SQLite's `SQLITE_FULL`, or `ENOSPC`/`EDQUOT` from a file
/// write): the client gets 503 and may retry; nothing was half-written (the transaction rolled back).
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = c.downcast_ref::<rusqlite::Error>() {
            return f.code == rusqlite::ErrorCode::DiskFull;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
                || matches!(io.raw_os_error(), Some(28) | Some(122)); // ENOSPC, EDQUOT
        }
        false
    })
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Internal(anyhow::Error::new(e).context("database"))
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Self {
        Error::Internal(anyhow::Error::new(e).context("database pool"))
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::bad_json(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            Error::Matrix(m) => {
                let mut body = serde_json::Map::new();
                body.insert("errcode".into(), json!(m.errcode));
                body.insert("error".into(), json!(m.message));
                if let Some(extra) = m.extra {
                    body.extend(extra);
                }
                (m.status, Value::Object(body))
            }
            Error::Internal(e) if is_disk_full(&e) => {
                tracing::error!(error = format!("{e:#}"), "disk full: refusing writes until space returns");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"errcode": "M_UNKNOWN", "error": "the server's disk is full; try again later"}),
                )
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, json!({"errcode": "M_UNKNOWN", "error": "internal server error"}))
            }
        };
        (status, axum::Json(body)).into_response()
    }
}
