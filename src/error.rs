//! The one place where failures become Matrix errors (`errcode` + HTTP status).
//!
//! Everything below the HTTP layer returns [`Error`]; handlers never build error bodies by hand. Code below the
//! handlers says *what* went wrong (a [`Kind`] through a named constructor, a [`RemoteFailure`], unreadable stored
//! JSON, an internal error); [`Kind::code`] alone decides the status and `errcode` a client or peer sees.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in the terms of the request. [`Kind::code`] maps each kind to its status and `errcode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Forbidden,
    NotFound,
    /// The request's JSON does not have the expected shape.
    BadJson,
    /// The request's body is not JSON at all.
    NotJson,
    InvalidParam,
    MissingParam,
    Unrecognized,
    MethodNotAllowed,
    MissingToken,
    UnknownToken,
    TooLarge,
    LimitExceeded,
    UserInUse,
    InvalidUsername,
    /// A room version this server does not implement (room creation, upgrades).
    UnsupportedRoomVersion,
    /// A room whose version one side of a federation exchange does not support (joins, invites, `make_join`).
    IncompatibleRoomVersion,
    RoomInUse,
    BadAlias,
    /// 400 `M_UNKNOWN`: a request refused for a reason no specific code names.
    BadRequest,
    Unauthorized,
    InvalidSignature,
    /// 405 for account data types the server manages (the spec pairs the status with `M_BAD_JSON`).
    ServerManaged,
    NotYetUploaded,
    CannotOverwriteMedia,
    ResourceLimit,
    WrongRoomKeysVersion,
    /// MSC3902: this server holds only partial state for the room.
    UnableDueToPartialState,
    /// 400 `M_UNKNOWN_POS`: a sliding sync position the server no longer holds (MSC4186).
    UnknownPos,
    GuestAccessForbidden,
    /// A failed user-interactive auth stage (the spec answers it with 401 and `M_FORBIDDEN`).
    AuthStageFailed,
    /// 409: the thing to create exists already (room aliases).
    Conflict,
    /// 408: the request's body did not arrive in time.
    RequestTimeout,
    /// 504: our own work the request waits for did not finish in time.
    Timeout,
    /// 503: the server cannot take the request now (shutting down, disk full).
    Unavailable,
    /// 502: a remote server failed us (unreachable, an error answer, an unusable answer).
    RemoteFailed,
    /// 500: a bug or a broken database; the details are logged, not shown.
    Internal,
    /// A status and code chosen with [`Error::matrix`] (prefer adding a kind).
    Other(StatusCode, &'static str),
}

impl Kind {
    /// The HTTP status and Matrix `errcode` of this kind: the only such mapping in the server.
    pub fn code(self) -> (StatusCode, &'static str) {
        use Kind::*;
        match self {
            Forbidden => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            NotFound => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            BadJson => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            NotJson => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            InvalidParam => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            MissingParam => (StatusCode::BAD_REQUEST, "M_MISSING_PARAM"),
            Unrecognized => (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            MissingToken => (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
            UnknownToken => (StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
            TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            LimitExceeded => (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"),
            UserInUse => (StatusCode::BAD_REQUEST, "M_USER_IN_USE"),
            InvalidUsername => (StatusCode::BAD_REQUEST, "M_INVALID_USERNAME"),
            UnsupportedRoomVersion => (StatusCode::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"),
            IncompatibleRoomVersion => (StatusCode::BAD_REQUEST, "M_INCOMPATIBLE_ROOM_VERSION"),
            RoomInUse => (StatusCode::BAD_REQUEST, "M_ROOM_IN_USE"),
            BadAlias => (StatusCode::BAD_REQUEST, "M_BAD_ALIAS"),
            BadRequest => (StatusCode::BAD_REQUEST, "M_UNKNOWN"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED"),
            InvalidSignature => (StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE"),
            ServerManaged => (StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON"),
            NotYetUploaded => (StatusCode::GATEWAY_TIMEOUT, "M_NOT_YET_UPLOADED"),
            CannotOverwriteMedia => (StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA"),
            ResourceLimit => (StatusCode::FORBIDDEN, "M_RESOURCE_LIMIT_EXCEEDED"),
            WrongRoomKeysVersion => (StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION"),
            UnableDueToPartialState => (StatusCode::FORBIDDEN, "M_UNABLE_DUE_TO_PARTIAL_STATE"),
            UnknownPos => (StatusCode::BAD_REQUEST, "M_UNKNOWN_POS"),
            GuestAccessForbidden => (StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN"),
            AuthStageFailed => (StatusCode::UNAUTHORIZED, "M_FORBIDDEN"),
            Conflict => (StatusCode::CONFLICT, "M_UNKNOWN"),
            RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "M_UNKNOWN"),
            Timeout => (StatusCode::GATEWAY_TIMEOUT, "M_UNKNOWN"),
            Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN"),
            RemoteFailed => (StatusCode::BAD_GATEWAY, "M_UNKNOWN"),
            Internal => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
            Other(status, errcode) => (status, errcode),
        }
    }
}

/// A failure as a client or a peer server sees it.
#[derive(Debug)]
pub struct MatrixError {
    pub kind: Kind,
    pub message: String,
    /// Extra top-level fields merged into the body (`retry_after_ms`, UIA `flows`, ...).
    pub extra: Option<serde_json::Map<String, Value>>,
}

impl MatrixError {
    pub fn status(&self) -> StatusCode {
        self.kind.code().0
    }
    pub fn errcode(&self) -> &'static str {
        self.kind.code().1
    }
}

/// A remote server failed a request we made for a client: it was unreachable, answered with an error, or its
/// answer was unusable. Its HTTP status is never ours: the client gets our 502, except for the refusals the spec
/// gives a code of their own (see [`RemoteFailure::kind`]).
#[derive(Debug)]
pub struct RemoteFailure {
    /// The server we asked.
    pub server: String,
    /// Its HTTP status, if it answered with an error.
    pub status: Option<u16>,
    /// The `errcode` of its error answer, if any.
    pub errcode: Option<String>,
    /// The `room_version` field of its error answer (`M_INCOMPATIBLE_ROOM_VERSION`).
    pub room_version: Option<String>,
    /// What happened, for people ("remote server b.example answered 404 M_NOT_FOUND: unknown room").
    pub message: String,
}

impl RemoteFailure {
    /// How the failure reaches our client: the remote's refusal of the user (403 `M_FORBIDDEN`: banned, not
    /// invited, denied by the room's ACL) and a room version we cannot join (`M_INCOMPATIBLE_ROOM_VERSION`) keep
    /// the codes the client-server spec gives them for joins and invites; everything else is a 502.
    pub fn kind(&self) -> Kind {
        match (self.status, self.errcode.as_deref()) {
            (Some(403), Some("M_FORBIDDEN")) => Kind::Forbidden,
            (Some(400), Some("M_INCOMPATIBLE_ROOM_VERSION")) => Kind::IncompatibleRoomVersion,
            _ => Kind::RemoteFailed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {}", .0.errcode(), .0.message)]
    Matrix(Box<MatrixError>),
    /// A remote server's failure (see [`RemoteFailure`]).
    #[error("{}", .0.message)]
    Remote(Box<RemoteFailure>),
    /// JSON read from our own database (or built by us) that does not parse: our data is bad, not the request.
    #[error("stored JSON is unreadable: {0}")]
    StoredJson(serde_json::Error),
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// An error of the given kind.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error::Matrix(Box::new(MatrixError { kind, message: message.into(), extra: None }))
    }

    /// An error with a status and code chosen by the caller. Prefer a named constructor (or a new [`Kind`]), so
    /// that codes are chosen here.
    pub fn matrix(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self::new(Kind::Other(status, errcode), message)
    }

    /// Adds a top-level field to the error body.
    pub fn with(mut self, key: &str, value: Value) -> Self {
        if let Error::Matrix(m) = &mut self {
            m.extra.get_or_insert_with(Default::default).insert(key.to_owned(), value);
        }
        self
    }

    /// What kind of failure this is (internal errors on a full disk are [`Kind::Unavailable`]).
    pub fn kind(&self) -> Kind {
        match self {
            Error::Matrix(m) => m.kind,
            Error::Remote(r) => r.kind(),
            Error::StoredJson(_) => Kind::Internal,
            Error::Internal(e) if is_disk_full(e) => Kind::Unavailable,
            Error::Internal(_) => Kind::Internal,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind().code().0
    }

    pub fn errcode(&self) -> &'static str {
        self.kind().code().1
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::new(Kind::Forbidden, msg)
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, msg)
    }
    /// The client sent JSON of the wrong shape. (Stored JSON that does not parse is [`Error::StoredJson`].)
    pub fn bad_json(msg: impl Into<String>) -> Self {
        Self::new(Kind::BadJson, msg)
    }
    pub fn not_json(msg: impl Into<String>) -> Self {
        Self::new(Kind::NotJson, msg)
    }
    pub fn invalid_param(msg: impl Into<String>) -> Self {
        Self::new(Kind::InvalidParam, msg)
    }
    pub fn missing_param(msg: impl Into<String>) -> Self {
        Self::new(Kind::MissingParam, msg)
    }
    pub fn unrecognized(msg: impl Into<String>) -> Self {
        Self::new(Kind::Unrecognized, msg)
    }
    pub fn method_not_allowed() -> Self {
        Self::new(Kind::MethodNotAllowed, "method not allowed on this endpoint")
    }
    pub fn missing_token() -> Self {
        Self::new(Kind::MissingToken, "missing access token")
    }
    pub fn unknown_token() -> Self {
        Self::new(Kind::UnknownToken, "unknown or expired access token").with("soft_logout", json!(false))
    }
    pub fn too_large(msg: impl Into<String>) -> Self {
        Self::new(Kind::TooLarge, msg)
    }
    pub fn limit_exceeded(retry_after_ms: u64) -> Self {
        Self::new(Kind::LimitExceeded, "too many requests").with("retry_after_ms", json!(retry_after_ms))
    }
    pub fn user_in_use() -> Self {
        Self::new(Kind::UserInUse, "user id already taken")
    }
    pub fn invalid_username(msg: impl Into<String>) -> Self {
        Self::new(Kind::InvalidUsername, msg)
    }
    pub fn unsupported_room_version(msg: impl Into<String>) -> Self {
        Self::new(Kind::UnsupportedRoomVersion, msg)
    }
    /// A room of version `room_version` that one side of a federation exchange does not support; the body names
    /// the version (`room_version`), as the spec asks.
    pub fn incompatible_room_version(room_version: &str) -> Self {
        Self::new(Kind::IncompatibleRoomVersion, format!("incompatible room version {room_version}"))
            .with("room_version", json!(room_version))
    }
    pub fn room_in_use(msg: impl Into<String>) -> Self {
        Self::new(Kind::RoomInUse, msg)
    }
    pub fn bad_alias(msg: impl Into<String>) -> Self {
        Self::new(Kind::BadAlias, msg)
    }
    /// 400 `M_UNKNOWN`.
    pub fn unknown(msg: impl Into<String>) -> Self {
        Self::new(Kind::BadRequest, msg)
    }
    pub fn unauthorized(msg: impl Into<String>) -> Self {
        Self::new(Kind::Unauthorized, msg)
    }
    pub fn invalid_signature(msg: impl Into<String>) -> Self {
        Self::new(Kind::InvalidSignature, msg)
    }
    /// 405 for account data types the server manages (the spec pairs the status with `M_BAD_JSON`).
    pub fn server_managed(msg: impl Into<String>) -> Self {
        Self::new(Kind::ServerManaged, msg)
    }
    /// Media created for an async upload whose content has not arrived (within the client's `timeout_ms`).
    pub fn not_yet_uploaded() -> Self {
        Self::new(Kind::NotYetUploaded, "the media has not been uploaded yet")
    }
    /// An async-upload target that already has its content.
    pub fn cannot_overwrite_media() -> Self {
        Self::new(Kind::CannotOverwriteMedia, "the media already has content")
    }
    /// A per-user limit (media quota) reached.
    pub fn resource_limit(msg: impl Into<String>) -> Self {
        Self::new(Kind::ResourceLimit, msg)
    }
    /// A remote server could not give us what a client asked for (media fetch failures).
    pub fn bad_gateway(msg: impl Into<String>) -> Self {
        Self::new(Kind::RemoteFailed, msg)
    }
    /// A remote server's failure, as [`RemoteFailure::kind`] maps it.
    pub fn remote(failure: RemoteFailure) -> Self {
        Error::Remote(Box::new(failure))
    }
    /// Keys sent to a key-backup version that is not the current one.
    pub fn wrong_room_keys_version(current_version: String) -> Self {
        Self::new(Kind::WrongRoomKeysVersion, "that backup version is not the current one")
            .with("current_version", json!(current_version))
    }
    /// MSC3902: a request this server cannot serve while it holds only partial state for the room.
    pub fn unable_due_to_partial_state(msg: impl Into<String>) -> Self {
        Self::new(Kind::UnableDueToPartialState, msg)
    }
    pub fn unknown_pos() -> Self {
        Self::new(Kind::UnknownPos, "unknown or expired position: start a new connection")
    }
    pub fn guest_access_forbidden() -> Self {
        Self::new(Kind::GuestAccessForbidden, "guest access is disabled")
    }
    /// A failed user-interactive auth stage (401 `M_FORBIDDEN`; the caller adds the flows and session).
    pub fn auth_stage_failed(msg: impl Into<String>) -> Self {
        Self::new(Kind::AuthStageFailed, msg)
    }
    /// 409: what the request would create exists already.
    pub fn conflict(msg: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, msg)
    }
    /// 408: the request's body did not arrive in time.
    pub fn request_timeout(msg: impl Into<String>) -> Self {
        Self::new(Kind::RequestTimeout, msg)
    }
    /// 504: work of ours that the request waits for did not finish in time.
    pub fn timeout(msg: impl Into<String>) -> Self {
        Self::new(Kind::Timeout, msg)
    }
    /// 503: the server cannot take requests now.
    pub fn unavailable(msg: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, msg)
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

/// `?` on a `serde_json` error means JSON we stored (or built) is bad: a 500, logged. JSON sent by a client or a
/// peer is checked where it arrives and refused there with [`Error::bad_json`] / [`Error::not_json`].
impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::StoredJson(e)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, errcode) = self.kind().code();
        let body = match self {
            Error::Matrix(m) => {
                let mut body = serde_json::Map::new();
                body.insert("errcode".into(), json!(errcode));
                body.insert("error".into(), json!(m.message));
                if let Some(extra) = m.extra {
                    body.extend(extra);
                }
                Value::Object(body)
            }
            Error::Remote(r) => {
                tracing::info!(server = %r.server, error = %r.message, "remote server failed a request");
                let mut body = json!({"errcode": errcode, "error": r.message});
                if let (Kind::IncompatibleRoomVersion, Some(v)) = (r.kind(), &r.room_version) {
                    body["room_version"] = json!(v);
                }
                body
            }
            Error::StoredJson(e) => {
                tracing::error!(error = %e, "stored JSON is unreadable");
                json!({"errcode": errcode, "error": "internal server error"})
            }
            Error::Internal(e) if status == StatusCode::SERVICE_UNAVAILABLE => {
                tracing::error!(error = format!("{e:#}"), "disk full: refusing writes until space returns");
                json!({"errcode": errcode, "error": "the server's disk is full; try again later"})
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                json!({"errcode": errcode, "error": "internal server error"})
            }
        };
        (status, axum::Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(e: Error) -> (u16, String, Value) {
        let res = e.into_response();
        let status = res.status().as_u16();
        let bytes = futures::executor::block_on(axum::body::to_bytes(res.into_body(), 1 << 20)).unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        (status, body["errcode"].as_str().unwrap().to_owned(), body)
    }

    #[test]
    fn every_kind_has_its_status_and_errcode() {
        use Kind::*;
        let table: &[(Kind, u16, &str)] = &[
            (Forbidden, 403, "M_FORBIDDEN"),
            (NotFound, 404, "M_NOT_FOUND"),
            (BadJson, 400, "M_BAD_JSON"),
            (NotJson, 400, "M_NOT_JSON"),
            (InvalidParam, 400, "M_INVALID_PARAM"),
            (MissingParam, 400, "M_MISSING_PARAM"),
            (Unrecognized, 404, "M_UNRECOGNIZED"),
            (MethodNotAllowed, 405, "M_UNRECOGNIZED"),
            (MissingToken, 401, "M_MISSING_TOKEN"),
            (UnknownToken, 401, "M_UNKNOWN_TOKEN"),
            (TooLarge, 413, "M_TOO_LARGE"),
            (LimitExceeded, 429, "M_LIMIT_EXCEEDED"),
            (UserInUse, 400, "M_USER_IN_USE"),
            (InvalidUsername, 400, "M_INVALID_USERNAME"),
            (UnsupportedRoomVersion, 400, "M_UNSUPPORTED_ROOM_VERSION"),
            (IncompatibleRoomVersion, 400, "M_INCOMPATIBLE_ROOM_VERSION"),
            (RoomInUse, 400, "M_ROOM_IN_USE"),
            (BadAlias, 400, "M_BAD_ALIAS"),
            (BadRequest, 400, "M_UNKNOWN"),
            (Unauthorized, 401, "M_UNAUTHORIZED"),
            (InvalidSignature, 400, "M_INVALID_SIGNATURE"),
            (ServerManaged, 405, "M_BAD_JSON"),
            (NotYetUploaded, 504, "M_NOT_YET_UPLOADED"),
            (CannotOverwriteMedia, 409, "M_CANNOT_OVERWRITE_MEDIA"),
            (ResourceLimit, 403, "M_RESOURCE_LIMIT_EXCEEDED"),
            (WrongRoomKeysVersion, 403, "M_WRONG_ROOM_KEYS_VERSION"),
            (UnableDueToPartialState, 403, "M_UNABLE_DUE_TO_PARTIAL_STATE"),
            (GuestAccessForbidden, 403, "M_GUEST_ACCESS_FORBIDDEN"),
            (AuthStageFailed, 401, "M_FORBIDDEN"),
            (Conflict, 409, "M_UNKNOWN"),
            (RequestTimeout, 408, "M_UNKNOWN"),
            (Timeout, 504, "M_UNKNOWN"),
            (Unavailable, 503, "M_UNKNOWN"),
            (RemoteFailed, 502, "M_UNKNOWN"),
            (Internal, 500, "M_UNKNOWN"),
            (Other(StatusCode::IM_A_TEAPOT, "M_TEAPOT"), 418, "M_TEAPOT"),
        ];
        for &(kind, status, errcode) in table {
            assert_eq!(kind.code(), (StatusCode::from_u16(status).unwrap(), errcode), "{kind:?}");
            let (s, c, body) = parts(Error::new(kind, "why"));
            assert_eq!((s, c.as_str()), (status, errcode), "{kind:?} as a response");
            assert_eq!(body["error"], "why", "{kind:?}");
        }
    }

    #[test]
    fn constructors_choose_their_kinds() {
        let cases: Vec<(Error, Kind)> = vec![
            (Error::forbidden("x"), Kind::Forbidden),
            (Error::not_found("x"), Kind::NotFound),
            (Error::bad_json("x"), Kind::BadJson),
            (Error::not_json("x"), Kind::NotJson),
            (Error::invalid_param("x"), Kind::InvalidParam),
            (Error::missing_param("x"), Kind::MissingParam),
            (Error::unrecognized("x"), Kind::Unrecognized),
            (Error::method_not_allowed(), Kind::MethodNotAllowed),
            (Error::missing_token(), Kind::MissingToken),
            (Error::unknown_token(), Kind::UnknownToken),
            (Error::too_large("x"), Kind::TooLarge),
            (Error::limit_exceeded(5), Kind::LimitExceeded),
            (Error::user_in_use(), Kind::UserInUse),
            (Error::invalid_username("x"), Kind::InvalidUsername),
            (Error::unsupported_room_version("x"), Kind::UnsupportedRoomVersion),
            (Error::incompatible_room_version("9"), Kind::IncompatibleRoomVersion),
            (Error::room_in_use("x"), Kind::RoomInUse),
            (Error::bad_alias("x"), Kind::BadAlias),
            (Error::unknown("x"), Kind::BadRequest),
            (Error::unauthorized("x"), Kind::Unauthorized),
            (Error::invalid_signature("x"), Kind::InvalidSignature),
            (Error::server_managed("x"), Kind::ServerManaged),
            (Error::not_yet_uploaded(), Kind::NotYetUploaded),
            (Error::cannot_overwrite_media(), Kind::CannotOverwriteMedia),
            (Error::resource_limit("x"), Kind::ResourceLimit),
            (Error::bad_gateway("x"), Kind::RemoteFailed),
            (Error::wrong_room_keys_version("2".into()), Kind::WrongRoomKeysVersion),
            (Error::unable_due_to_partial_state("x"), Kind::UnableDueToPartialState),
            (Error::guest_access_forbidden(), Kind::GuestAccessForbidden),
            (Error::auth_stage_failed("x"), Kind::AuthStageFailed),
            (Error::conflict("x"), Kind::Conflict),
            (Error::request_timeout("x"), Kind::RequestTimeout),
            (Error::timeout("x"), Kind::Timeout),
            (Error::unavailable("x"), Kind::Unavailable),
            (Error::internal("x"), Kind::Internal),
        ];
        for (e, kind) in cases {
            assert_eq!(e.kind(), kind, "{e}");
        }
    }

    #[test]
    fn extra_fields_reach_the_body() {
        let (s, c, body) = parts(Error::incompatible_room_version("42"));
        assert_eq!((s, c.as_str(), &body["room_version"]), (400, "M_INCOMPATIBLE_ROOM_VERSION", &json!("42")));
        let (s, _, body) = parts(Error::limit_exceeded(1500));
        assert_eq!((s, &body["retry_after_ms"]), (429, &json!(1500)));
        let (_, _, body) = parts(Error::unknown_token());
        assert_eq!(body["soft_logout"], json!(false));
    }

    fn remote(status: Option<u16>, errcode: Option<&str>) -> RemoteFailure {
        RemoteFailure {
            server: "remote.example".into(),
            status,
            errcode: errcode.map(str::to_owned),
            room_version: Some("7".into()),
            message: "remote server remote.example answered".into(),
        }
    }

    #[test]
    fn remote_failures_are_ours_not_the_remote_status() {
        for (status, errcode) in [
            (Some(404), Some("M_NOT_FOUND")),
            (Some(401), Some("M_UNAUTHORIZED")),
            (Some(400), Some("M_BAD_JSON")),
            (Some(404), Some("M_UNABLE_DUE_TO_PARTIAL_STATE")),
            (Some(401), Some("M_FORBIDDEN")),
            (Some(500), None),
            (Some(429), Some("M_LIMIT_EXCEEDED")),
            (None, None),
        ] {
            let (s, c, body) = parts(Error::remote(remote(status, errcode)));
            assert_eq!((s, c.as_str()), (502, "M_UNKNOWN"), "{status:?} {errcode:?}");
            assert_eq!(body["error"], "remote server remote.example answered");
            assert!(body.get("room_version").is_none());
        }
    }

    #[test]
    fn remote_refusals_the_spec_names_keep_their_code() {
        let (s, c, _) = parts(Error::remote(remote(Some(403), Some("M_FORBIDDEN"))));
        assert_eq!((s, c.as_str()), (403, "M_FORBIDDEN"));
        let (s, c, body) = parts(Error::remote(remote(Some(400), Some("M_INCOMPATIBLE_ROOM_VERSION"))));
        assert_eq!((s, c.as_str(), &body["room_version"]), (400, "M_INCOMPATIBLE_ROOM_VERSION", &json!("7")));
    }

    #[test]
    fn unreadable_stored_json_is_a_500_not_bad_json() {
        let e: Error = serde_json::from_str::<Value>("{not json").unwrap_err().into();
        assert_eq!(e.kind(), Kind::Internal);
        let (s, c, body) = parts(e);
        assert_eq!((s, c.as_str(), &body["error"]), (500, "M_UNKNOWN", &json!("internal server error")));
    }

    #[test]
    fn internal_errors_hide_details_and_disk_full_is_503() {
        let (s, c, body) = parts(Error::internal("secret detail"));
        assert_eq!((s, c.as_str()), (500, "M_UNKNOWN"));
        assert!(!body.to_string().contains("secret"));
        let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
        let (s, c, _) = parts(Error::from(full));
        assert_eq!((s, c.as_str()), (503, "M_UNKNOWN"));
    }
}
