//! The federation API: the endpoints other servers call (`/_matrix/federation/*`, `/_matrix/key/*`), each behind
//! the `http::Signed` extractor that verifies its `X-Matrix` authorization. The work is done by the federation
//! layer; the router merges the media repository's federation routes beside these.

mod hierarchy;
mod peek;
mod routes;
mod tools;

pub use routes::routes;
