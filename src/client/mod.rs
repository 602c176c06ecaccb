//! The client-server API: thin handlers that parse, authorise, call the room core and shape responses.

pub mod account;
pub mod account_data;
pub mod admin;
pub mod appservice;
pub mod appservice_extras;
pub mod compat;
pub mod format;
pub mod keys;
pub mod metrics;
pub mod notifications;
pub mod peek;
pub mod presence;
pub mod profile;
pub mod push;
pub mod push_rules;
pub mod pushers;
pub mod receipts;
pub mod relations;
pub mod reports;
pub mod room_keys;
pub mod rooms;
pub mod search;
pub mod sliding_sync;
pub mod spaces;
pub mod sync;
pub mod tags;
pub mod timeline;
pub mod tools;

use axum::routing::{get, post, put};
use axum::Router;

use crate::http::AppState;

/// Endpoints under `/_matrix/client/{v3,r0,unstable}`. Synapse serves (nearly) every endpoint under `unstable` too,
/// and clients that see an unstable feature advertised in `/versions` (`org.matrix.e2e_cross_signing`, say) use the
/// `unstable` prefix for its endpoints: Element Web 1.7 calls `/unstable/keys/device_signing/upload` and
/// `/unstable/room_keys/version`, and without them cannot set up keys after login.
fn api() -> Router<AppState> {
    use account as a;
    use rooms as r;
    Router::new()
        .route("/login", get(a::login_flows).post(a::login))
        .route("/logout", post(a::logout))
        .route("/logout/all", post(a::logout_all))
        .route("/register", post(a::register))
        .route("/refresh", post(a::refresh))
        .route("/register/available", get(a::register_available))
        .route("/account/whoami", get(a::whoami))
        .route("/account/password", post(a::change_password))
        .route("/account/deactivate", post(a::deactivate))
        .route("/capabilities", get(a::capabilities))
        .route("/user/{user_id}/filter", post(a::create_filter))
        .route("/user/{user_id}/filter/{filter_id}", get(a::get_filter))
        .route("/user/{user_id}/openid/request_token", post(tools::openid_request_token))
        .route("/devices", get(a::list_devices))
        .route("/devices/{device_id}", get(a::get_device).put(a::update_device).delete(a::delete_device))
        .route("/delete_devices", post(a::delete_devices))
        .route("/profile/{user_id}", get(profile::get_profile))
        .route("/profile/{user_id}/{field}", get(profile::get_field).put(profile::set_field))
        .route("/createRoom", post(r::create_room))
        .route("/join/{room}", post(r::join))
        .route("/rooms/{room}/join", post(r::join))
        .route("/rooms/{room_id}/leave", post(r::leave))
        .route("/knock/{room}", post(r::knock))
        .route("/rooms/{room_id}/forget", post(r::forget))
        .route("/rooms/{room_id}/upgrade", post(r::upgrade))
        .route("/rooms/{room_id}/invite", post(r::invite))
        .route("/rooms/{room_id}/kick", post(r::kick))
        .route("/rooms/{room_id}/ban", post(r::ban))
        .route("/rooms/{room_id}/unban", post(r::unban))
        .route("/joined_rooms", get(r::joined_rooms))
        .route("/rooms/{room_id}/send/{event_type}/{txn_id}", put(r::send))
        .route("/rooms/{room_id}/redact/{event_id}/{txn_id}", put(r::redact))
        .route("/rooms/{room_id}/state", get(r::get_state))
        .route("/rooms/{room_id}/state/{event_type}", get(r::get_state_event).put(r::put_state))
        .route("/rooms/{room_id}/state/{event_type}/", get(r::get_state_event).put(r::put_state))
        .route("/rooms/{room_id}/state/{event_type}/{state_key}", get(r::get_state_event).put(r::put_state))
        .route("/rooms/{room_id}/event/{event_id}", get(r::get_event))
        .route("/rooms/{room_id}/members", get(r::members))
        .route("/rooms/{room_id}/joined_members", get(r::joined_members))
        .route("/rooms/{room_id}/aliases", get(r::room_aliases))
        .route("/rooms/{room_id}/messages", get(timeline::messages))
        .route("/rooms/{room_id}/context/{event_id}", get(timeline::context))
        .route("/directory/room/{alias}", get(r::get_alias).put(r::put_alias).delete(r::delete_alias))
        .route("/directory/list/room/{room_id}", get(r::get_visibility).put(r::set_visibility))
        .route("/publicRooms", get(r::public_rooms_get).post(r::public_rooms_post))
        .route("/sync", get(sync::sync))
        .route("/search", post(search::search))
        .route("/rooms/{room_id}/report/{event_id}", post(reports::report_event))
        .route("/rooms/{room_id}/report", post(reports::report_room))
        .route("/users/{user_id}/report", post(reports::report_user))
        .merge(extras())
}

/// Account data, typing, receipts, push rules, E2EE keys and to-device messaging.
fn extras() -> Router<AppState> {
    use account_data as ad;
    use push_rules as pr;
    Router::new()
        .route("/user/{user_id}/account_data/{data_type}", get(ad::get_global).put(ad::put_global))
        .route("/user/{user_id}/rooms/{room_id}/account_data/{data_type}", get(ad::get_room).put(ad::put_room))
        .route("/rooms/{room_id}/typing/{user_id}", put(receipts::typing))
        .route("/rooms/{room_id}/receipt/{receipt_type}/{event_id}", post(receipts::receipt))
        .route("/rooms/{room_id}/read_markers", post(receipts::read_markers))
        .route("/pushrules", get(pr::get_all))
        .route("/pushrules/", get(pr::get_all))
        .route("/pushrules/{scope}", get(pr::get_scope))
        .route("/pushrules/{scope}/", get(pr::get_scope))
        .route("/pushrules/{scope}/{kind}/{rule_id}", get(pr::get_rule).put(pr::put_rule).delete(pr::delete_rule))
        .route("/pushrules/{scope}/{kind}/{rule_id}/{attr}", get(pr::get_attr).put(pr::put_attr))
        .route("/keys/upload", post(keys::upload))
        .route("/keys/query", post(keys::query))
        .route("/keys/claim", post(keys::claim))
        .route("/keys/changes", get(keys::changes))
        .route("/keys/device_signing/upload", post(keys::upload_signing_keys))
        .route("/keys/signatures/upload", post(keys::upload_signatures))
        .route("/sendToDevice/{event_type}/{txn_id}", put(keys::send_to_device))
        .merge(backup_and_tags())
}

/// Server-side key backup (`/room_keys/*`), room tags, presence and what clients probe on start-up.
fn backup_and_tags() -> Router<AppState> {
    use room_keys as rk;
    Router::new()
        .route("/room_keys/version", get(rk::get_latest_version).post(rk::create_version))
        .route("/room_keys/version/{version}", get(rk::get_version).put(rk::update_version).delete(rk::delete_version))
        .route("/room_keys/keys", get(rk::get_all).put(rk::put_all).delete(rk::delete_all))
        .route("/room_keys/keys/{room_id}", get(rk::get_room).put(rk::put_room).delete(rk::delete_room))
        .route(
            "/room_keys/keys/{room_id}/{session_id}",
            get(rk::get_session).put(rk::put_session).delete(rk::delete_session),
        )
        .route("/user/{user_id}/rooms/{room_id}/tags", get(tags::get_tags))
        .route("/user/{user_id}/rooms/{room_id}/tags/{tag}", put(tags::put_tag).delete(tags::delete_tag))
        .route("/presence/{user_id}/status", get(presence::get_presence).put(presence::put_presence))
        .route("/pushers", get(pushers::list))
        .route("/pushers/set", post(pushers::set))
        .route("/notifications", get(pushers::notifications))
        .route("/thirdparty/protocols", get(appservice::protocols))
        .route("/thirdparty/protocol/{protocol}", get(appservice::protocol))
        .route("/thirdparty/{kind}/{protocol}", get(appservice::lookup_by_protocol))
        .route("/thirdparty/{kind}", get(appservice::reverse_lookup))
        .route("/directory/list/appservice/{network_id}/{room_id}", put(appservice::set_network_listing))
        .route("/voip/turnServer", get(compat::turn_server))
        .route("/account/3pid", get(compat::threepids))
        .route("/user_directory/search", post(compat::user_directory_search))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/_matrix/client/versions", get(account::versions))
        .route("/.well-known/matrix/client", get(account::well_known))
        .route("/.well-known/matrix/server", get(account::well_known_server))
        .route("/_hearth/admin/v1/jobs", get(admin::jobs))
        .route("/_hearth/admin/v1/stats", get(admin::stats))
        .route(
            "/_matrix/client/v1/register/m.login.registration_token/validity",
            get(account::registration_token_validity),
        )
        .route("/_matrix/client/v1/rooms/{room_id}/hierarchy", get(spaces::hierarchy))
        .route("/_matrix/client/v1/room_summary/{room}", get(spaces::room_summary))
        .route("/_matrix/client/unstable/org.matrix.msc2753/peek/{room}", post(peek::peek))
        .route("/_matrix/client/unstable/org.matrix.msc2753/rooms/{room}/unpeek", post(peek::unpeek))
        .route("/_matrix/client/unstable/im.nheko.summary/summary/{room}", get(spaces::room_summary))
        .route("/_matrix/client/unstable/im.nheko.summary/rooms/{room}/summary", get(spaces::room_summary))
        .route("/_matrix/client/v1/rooms/{room_id}/relations/{event_id}", get(relations::relations))
        .route("/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}", get(relations::relations))
        .route(
            "/_matrix/client/v1/rooms/{room_id}/relations/{event_id}/{rel_type}/{event_type}",
            get(relations::relations),
        )
        .route("/_matrix/client/v1/rooms/{room_id}/threads", get(relations::threads))
        .route("/_matrix/client/v1/appservice/{appservice_id}/ping", post(appservice::ping))
        .route("/_matrix/client/v1/rooms/{room_id}/timestamp_to_event", get(tools::timestamp_to_event))
        .route("/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", post(sliding_sync::sync))
        .nest("/_matrix/client/v3", api())
        .nest("/_matrix/client/r0", api())
        .nest("/_matrix/client/unstable", api())
        .merge(crate::media::client_routes())
}
