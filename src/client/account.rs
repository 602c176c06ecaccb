//! Versions, login/logout, registration (with user-interactive auth), whoami, capabilities, filters, devices.

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::http::{random_string, AppState, Auth, Json, Query};
use crate::store::{accounts, e2ee, registration_tokens};

pub async fn versions() -> impl IntoResponse {
    axum::Json(json!({
        "versions": ["r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8",
                     "v1.9", "v1.10", "v1.11", "v1.12"],
        "unstable_features": {"org.matrix.msc3706": true, "org.matrix.msc2285.stable": true,
                              "org.matrix.msc3916.stable": true, "org.matrix.e2e_cross_signing": true,
                              // The room summary (`/room_summary`, stable in v1.15), which Element looks for here.
                              "org.matrix.msc3266": true,
                              // Simplified sliding sync (MSC4186), which Element X and matrix-rust-sdk need.
                              "org.matrix.simplified_msc3575": true,
                              // Peeking via /sync (`/peek`, `/unpeek`, `rooms.peek`), over federation too (MSC2444).
                              "org.matrix.msc2753": true}
    }))
}

/// `/.well-known/matrix/client`: `well_known.client_base_url` when configured, else 404 (never the listen address:
/// behind a reverse proxy that would send clients around the proxy).
pub async fn well_known(State(s): State<AppState>) -> Result<impl IntoResponse> {
    match &s.config.well_known.client_base_url {
        Some(base) => Ok(axum::Json(json!({"m.homeserver": {"base_url": base}}))),
        None => Err(Error::not_found("no client discovery configured (well_known.client_base_url)")),
    }
}

/// `/.well-known/matrix/server`: delegation, when `well_known.server` is configured.
pub async fn well_known_server(State(s): State<AppState>) -> Result<impl IntoResponse> {
    match &s.config.well_known.server {
        Some(server) => Ok(axum::Json(json!({"m.server": server}))),
        None => Err(Error::not_found("no server delegation configured")),
    }
}

pub async fn login_flows() -> impl IntoResponse {
    axum::Json(json!({"flows": [{"type": "m.login.password"}, {"type": "m.login.application_service"}]}))
}

#[derive(Deserialize)]
pub struct LoginRequest {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    /// The client can renew its access token (`POST /refresh`): a refresh token comes with it.
    #[serde(default)]
    refresh_token: bool,
}

/// Resolves `alice` or `@alice:server` to a full local user id. User names are matched without regard to case
/// (local parts are stored lower-cased, as registration makes them), as in Synapse.
pub fn local_user_id(s: &AppState, name: &str) -> Result<String> {
    let full = match name.strip_prefix('@').and_then(|n| n.split_once(':')) {
        Some((local, server)) => format!("@{}:{server}", local.to_lowercase()),
        None => format!("@{}:{}", name.to_lowercase(), s.identity.server_name),
    };
    if !s.identity.is_local_user(&full) {
        return Err(Error::forbidden("not a user of this server"));
    }
    Ok(full)
}

pub fn hash_password(password: &str) -> Result<String> {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("hashing failed: {e}")))
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| argon2::Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
}

/// Checks a local user's password off the async threads.
pub async fn check_password(s: &AppState, user_id: &str, password: &str) -> Result<bool> {
    let uid = user_id.to_owned();
    let user = s.store.read(move |c| accounts::get_user(c, &uid)).await?;
    let Some(hash) = user.filter(|u| !u.deactivated).and_then(|u| u.password_hash) else { return Ok(false) };
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || verify_password(&hash, &password))
        .await
        .map_err(|e| Error::internal(e.to_string()))
}

/// Every password check (`/login` and each `m.login.password` stage of user-interactive auth: `/delete_devices`,
/// `DELETE /devices/{id}`, `/account/password`, `/account/deactivate`, cross-signing key replacement) goes through
/// here, as in Synapse: every check counts against the address (`limits.logins_per_second`/`logins_burst`, Synapse's
/// `rc_login.address`), failed ones against the user (`limits.login_failures_per_minute`, Synapse's
/// `rc_login.failed_attempts`) and the address alike. Once any is spent the check answers 429 `M_LIMIT_EXCEEDED`
/// with `retry_after_ms` before the password is looked at, so guessing through any endpoint is as slow as through
/// `/login`.
pub async fn check_password_limited(s: &AppState, user_id: &str, ip: &str, password: &str) -> Result<bool> {
    for key in [user_id, ip] {
        s.login_limiter.check(key).map_err(Error::limit_exceeded)?;
    }
    s.login_attempt_limiter.take(ip).map_err(Error::limit_exceeded)?;
    let ok = check_password(s, user_id, password).await?;
    if !ok {
        let _ = s.login_limiter.take(user_id);
        let _ = s.login_limiter.take(ip);
    }
    Ok(ok)
}

pub async fn login(
    State(s): State<AppState>,
    parts: Parts,
    Json(req): Json<LoginRequest>,
) -> Result<impl IntoResponse> {
    let appservice = req.kind == "m.login.application_service";
    if req.kind != "m.login.password" && !appservice {
        return Err(Error::unknown(format!("login type {} is not supported", req.kind)));
    }
    let name = req
        .identifier
        .as_ref()
        .and_then(|i| (i.get("type").and_then(Value::as_str) == Some("m.id.user")).then(|| i.get("user")).flatten())
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(req.user.clone())
        .ok_or_else(|| Error::bad_json("missing user identifier"))?;
    let user_id = if appservice {
        crate::client::appservice::login_user(&s, &parts, &name).await?
    } else {
        let password = req.password.ok_or_else(|| Error::bad_json("missing password"))?;
        let ip = crate::http::client_ip(&parts, &s.config);
        let Ok(user_id) = local_user_id(&s, &name) else {
            // No password to check, but an attempt all the same: it counts against the address.
            s.login_attempt_limiter.take(&ip).map_err(Error::limit_exceeded)?;
            return Err(Error::forbidden("invalid username or password"));
        };
        if !check_password_limited(&s, &user_id, &ip, &password).await? {
            return Err(Error::forbidden("invalid username or password"));
        }
        user_id
    };
    let device_id = req.device_id.unwrap_or_else(|| random_string(10).to_uppercase());
    let token = format!("hth_{}", random_string(40));
    let (u, d, t, name) = (user_id.clone(), device_id.clone(), token.clone(), req.initial_device_display_name);
    let refresh = req.refresh_token.then(new_refresh_token);
    let r = refresh.clone();
    s.store
        .write(move |w| {
            accounts::create_session(w.db(), &u, &d, name.as_deref(), &t)?;
            r.map_or(Ok(()), |r| accounts::add_refresh_token(w.db(), &t, &r))
        })
        .await?;
    let mut body = json!({
        "user_id": user_id, "access_token": token, "device_id": device_id,
        "home_server": s.identity.server_name.as_str(),
    });
    if let Some(base) = &s.config.well_known.client_base_url {
        body["well_known"] = json!({"m.homeserver": {"base_url": base}});
    }
    if let Some(r) = refresh {
        // Access tokens do not expire here, so no `expires_in_ms`: the refresh token only rotates them.
        body["refresh_token"] = json!(r);
    }
    Ok(axum::Json(body))
}

fn new_refresh_token() -> String {
    format!("hthr_{}", random_string(40))
}

#[derive(Deserialize)]
pub struct RefreshRequest {
    refresh_token: String,
}

/// `POST /refresh`: a new access token (and refresh token) for the device; the old pair stops working.
pub async fn refresh(State(s): State<AppState>, Json(req): Json<RefreshRequest>) -> Result<impl IntoResponse> {
    let (access, refresh) = (format!("hth_{}", random_string(40)), new_refresh_token());
    let (a, r) = (access.clone(), refresh.clone());
    let used = s.store.write(move |w| accounts::use_refresh_token(w.db(), &req.refresh_token, &a, &r)).await?;
    if used.is_none() {
        return Err(Error::unknown_token());
    }
    Ok(axum::Json(json!({"access_token": access, "refresh_token": refresh})))
}

/// Logs out the token and, as the spec requires, deletes its device (with the device's keys).
pub async fn logout(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    delete_devices_now(&s, auth.user_id.as_str(), vec![auth.device_id.clone()]).await?;
    s.store.write(move |w| accounts::delete_token(w.db(), &auth.token)).await?;
    Ok(axum::Json(json!({})))
}

/// Logs out every token of the user and deletes all their devices.
pub async fn logout_all(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    let uid = auth.user_id.clone();
    let devices = s.store.read(move |c| accounts::list_devices(c, uid.as_str())).await?;
    delete_devices_now(&s, auth.user_id.as_str(), devices.into_iter().map(|d| d.device_id).collect()).await?;
    s.store.write(move |w| accounts::delete_all_tokens(w.db(), auth.user_id.as_str())).await?;
    Ok(axum::Json(json!({})))
}

pub async fn whoami(auth: Auth) -> impl IntoResponse {
    // An application service acting as a user without naming a device (MSC3202) has none.
    let mut body = json!({"user_id": auth.user_id, "is_guest": false});
    if !auth.device_id.is_empty() {
        body["device_id"] = json!(auth.device_id);
    }
    axum::Json(body)
}

/// Capabilities are per user, so the endpoint needs an access token (the spec marks it "requires authentication").
pub async fn capabilities(State(s): State<AppState>, _auth: Auth) -> impl IntoResponse {
    let available: serde_json::Map<String, Value> =
        crate::room::version::SUPPORTED.iter().map(|v| (v.to_string(), json!("stable"))).collect();
    axum::Json(json!({"capabilities": {
        "m.change_password": {"enabled": true},
        "m.room_versions": {"default": s.config.rooms.default_version, "available": available},
        "m.set_displayname": {"enabled": true},
        "m.set_avatar_url": {"enabled": true},
        "m.3pid_changes": {"enabled": false}
    }}))
}

// ------------------------------------------------------------------------------------------------------------
// Registration

#[derive(Deserialize)]
pub struct RegisterRequest {
    /// `m.login.application_service`: an application service registers a user of its namespace.
    #[serde(rename = "type")]
    kind: Option<String>,
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    auth: Option<Value>,
    #[serde(default)]
    refresh_token: bool,
}

#[derive(Deserialize)]
pub struct KindQuery {
    kind: Option<String>,
}

pub fn validate_localpart(localpart: &str, server_name: &str) -> Result<()> {
    if localpart.is_empty()
        || !localpart.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
    {
        return Err(Error::invalid_username("user names may contain only a-z, 0-9 and ._=-/+"));
    }
    if localpart.len() + server_name.len() + 2 > 255 {
        return Err(Error::invalid_username("user id too long"));
    }
    Ok(())
}

pub async fn register(
    State(s): State<AppState>,
    Query(q): Query<KindQuery>,
    parts: Parts,
    Json(req): Json<RegisterRequest>,
) -> Result<axum::response::Response> {
    if q.kind.as_deref() == Some("guest") {
        return Err(Error::guest_access_forbidden());
    }
    let auth_type = req.auth.as_ref().and_then(|a| a.get("type")).and_then(Value::as_str);
    if req.kind.as_deref() == Some(AS_LOGIN) || auth_type == Some(AS_LOGIN) {
        return register_appservice_user(&s, &parts, req).await;
    }
    if !s.config.registration.enabled {
        return Err(Error::forbidden("registration is disabled"));
    }
    let server = s.identity.server_name.to_string();
    let localpart = match &req.username {
        // The user name is a local part: anything outside its alphabet (`@`, `:` included) is refused.
        Some(u) => u.to_lowercase(),
        None => random_string(12).to_lowercase(),
    };
    validate_localpart(&localpart, &server)?;
    let user_id = format!("@{localpart}:{server}");
    if s.appservices.exclusive_user_owner(&user_id).is_some() {
        return Err(crate::client::appservice::exclusive("this user id is reserved by an application service"));
    }
    let uid = user_id.clone();
    if s.store.read(move |c| accounts::user_exists(c, &uid)).await? {
        return Err(Error::user_in_use());
    }

    // User-interactive auth.
    let reg = &s.config.registration;
    let needs_token = reg.token.is_some() || reg.requires_token;
    let stage = if needs_token { "m.login.registration_token" } else { "m.login.dummy" };
    let challenge = |session: String, completed: Vec<String>, err: Option<(&str, &str)>| {
        let mut body =
            json!({"flows": [{"stages": [stage]}], "params": {}, "session": session, "completed": completed});
        if let Some((code, msg)) = err {
            body["errcode"] = json!(code);
            body["error"] = json!(msg);
        }
        (axum::http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response()
    };
    let Some(auth) = req.auth else {
        return Ok(challenge(s.uia.new_session(), vec![], None));
    };
    let session = auth.get("session").and_then(Value::as_str).map(str::to_owned);
    let session = match session {
        Some(id) if s.uia.completed(&id).is_some() => id,
        // nio sends m.login.dummy without a session in its first request: start one on the fly.
        _ => s.uia.new_session(),
    };
    match auth.get("type").and_then(Value::as_str) {
        Some("m.login.dummy") if stage == "m.login.dummy" => s.uia.complete(&session, stage),
        Some("m.login.registration_token") if stage == "m.login.registration_token" => {
            let given = auth.get("token").and_then(Value::as_str).unwrap_or_default().to_owned();
            if s.config.registration.token.as_deref() != Some(given.as_str()) {
                if !token_valid(&s, &given).await? {
                    return Ok(challenge(session, vec![], Some(("M_FORBIDDEN", "invalid registration token"))));
                }
                s.uia.set_token(&session, &given);
            }
            s.uia.complete(&session, stage);
        }
        _ => {}
    }
    let done = s.uia.completed(&session).unwrap_or_default();
    if !done.iter().any(|d| d == stage) {
        return Ok(challenge(session, done, None));
    }
    // Only account creations count (the user-interactive-auth round trips before do not).
    let ip = crate::http::client_ip(&parts, &s.config);
    s.registration_limiter.take(&ip).map_err(Error::limit_exceeded)?;
    let used_token = s.uia.token(&session);
    s.uia.finish(&session);

    let password = req.password.clone();
    let hash = match password {
        Some(p) => Some(
            tokio::task::spawn_blocking(move || hash_password(&p))
                .await
                .map_err(|e| Error::internal(e.to_string()))??,
        ),
        None => None,
    };
    create_account(
        &s,
        user_id,
        hash,
        used_token,
        NewSession::of_fields(&req.device_id, &req.initial_device_display_name, req.inhibit_login, req.refresh_token),
    )
    .await
}

/// What a registration asks of the session it opens.
struct NewSession {
    device_id: Option<String>,
    display_name: Option<String>,
    inhibit_login: bool,
    refresh_token: bool,
}

impl NewSession {
    fn of_fields(
        device_id: &Option<String>,
        display_name: &Option<String>,
        inhibit_login: bool,
        refresh_token: bool,
    ) -> Self {
        NewSession { device_id: device_id.clone(), display_name: display_name.clone(), inhibit_login, refresh_token }
    }
}

/// The tail both kinds of registration share: the user row (with its password hash, if any), the registration
/// token's use (ordinary registration only), and unless `inhibit_login` a device with an access token (and a
/// refresh token when asked for), in one write; then the answer.
async fn create_account(
    s: &AppState,
    user_id: String,
    hash: Option<String>,
    used_token: Option<String>,
    req: NewSession,
) -> Result<axum::response::Response> {
    let server = s.identity.server_name.to_string();
    let device_id = req.device_id.clone().unwrap_or_else(|| random_string(10).to_uppercase());
    let token = format!("hth_{}", random_string(40));
    let (u, d, t, dn, inhibit) =
        (user_id.clone(), device_id.clone(), token.clone(), req.display_name.clone(), req.inhibit_login);
    let refresh = req.refresh_token.then(new_refresh_token);
    let r = refresh.clone();
    s.store
        .write(move |w| {
            if !accounts::insert_user(w.db(), &u, hash.as_deref(), false)? {
                return Err(Error::user_in_use());
            }
            // A token made by `hearth token create` counts one use, if it still has one (the write is atomic: two
            // registrations cannot both take its last use).
            if let Some(t) = &used_token {
                if !registration_tokens::consume(w.db(), t, accounts::now_ms())? {
                    return Err(Error::forbidden("the registration token was used up, expired or revoked meanwhile"));
                }
            }
            if !inhibit {
                accounts::create_session(w.db(), &u, &d, dn.as_deref(), &t)?;
                if let Some(r) = &r {
                    accounts::add_refresh_token(w.db(), &t, r)?;
                }
            }
            Ok(())
        })
        .await?;
    let mut body = json!({"user_id": user_id, "home_server": server});
    if !req.inhibit_login {
        body["access_token"] = json!(token);
        body["device_id"] = json!(device_id);
        if let Some(r) = refresh {
            body["refresh_token"] = json!(r);
        }
    }
    Ok(axum::Json(body).into_response())
}

const AS_LOGIN: &str = "m.login.application_service";

/// `POST /register` with `type: m.login.application_service`: the application service whose `as_token` came with
/// the request creates a user of its namespace (no password, no user-interactive auth, even with registration
/// closed); a name outside its namespace is 400 `M_EXCLUSIVE`.
async fn register_appservice_user(
    s: &AppState,
    parts: &Parts,
    req: RegisterRequest,
) -> Result<axum::response::Response> {
    let service = crate::http::appservice_of(parts, s).ok_or_else(|| {
        if crate::http::has_token(parts) {
            Error::unknown_token()
        } else {
            Error::missing_token()
        }
    })?;
    let server = s.identity.server_name.to_string();
    let localpart = req.username.clone().ok_or_else(|| Error::bad_json("username is required"))?.to_lowercase();
    validate_localpart(&localpart, &server)?;
    let user_id = format!("@{localpart}:{server}");
    if !service.owns_user(&user_id) {
        return Err(crate::client::appservice::exclusive("the user id is outside the application service's namespace"));
    }
    let session =
        NewSession::of_fields(&req.device_id, &req.initial_device_display_name, req.inhibit_login, req.refresh_token);
    create_account(s, user_id, None, None, session).await
}

/// Whether a token made by `hearth token create` is valid now.
async fn token_valid(s: &AppState, token: &str) -> Result<bool> {
    if token.is_empty() {
        return Ok(false);
    }
    let t = token.to_owned();
    let row = s.store.read(move |c| registration_tokens::get(c, &t)).await?;
    Ok(row.is_some_and(|r| r.valid_at(accounts::now_ms())))
}

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// `GET /_matrix/client/v1/register/m.login.registration_token/validity`: whether a registration token is valid now
/// (the static `registration.token` or one made with `hearth token create`); 403 when registration is off.
/// Rate-limited per address like login attempts, against guessing.
pub async fn registration_token_validity(
    State(s): State<AppState>,
    parts: Parts,
    Query(q): Query<TokenQuery>,
) -> Result<impl IntoResponse> {
    if !s.config.registration.enabled {
        return Err(Error::forbidden("registration is not enabled on this homeserver"));
    }
    let token = q.token.ok_or_else(|| Error::missing_param("token is required"))?;
    s.token_validity_limiter.take(&crate::http::client_ip(&parts, &s.config)).map_err(Error::limit_exceeded)?;
    let valid = s.config.registration.token.as_deref() == Some(token.as_str()) || token_valid(&s, &token).await?;
    Ok(axum::Json(json!({"valid": valid})))
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: Option<String>,
}

pub async fn register_available(
    State(s): State<AppState>,
    Query(q): Query<AvailableQuery>,
) -> Result<impl IntoResponse> {
    if !s.config.registration.enabled {
        return Err(Error::forbidden("registration is disabled"));
    }
    let name = q.username.ok_or_else(|| Error::missing_param("username is required"))?.to_lowercase();
    validate_localpart(&name, s.identity.server_name.as_str())?;
    let uid = format!("@{name}:{}", s.identity.server_name);
    if s.appservices.exclusive_user_owner(&uid).is_some() {
        return Err(crate::client::appservice::exclusive("this user id is reserved by an application service"));
    }
    if s.store.read(move |c| accounts::user_exists(c, &uid)).await? {
        return Err(Error::user_in_use());
    }
    Ok(axum::Json(json!({"available": true})))
}

// ------------------------------------------------------------------------------------------------------------
// Password-protected operations (UIA with m.login.password)

/// Completes UIA with `m.login.password` for an already-authenticated user, or answers 401 with the flow.
pub async fn require_password(s: &AppState, auth: &Auth, body_auth: Option<&Value>) -> Result<()> {
    let flows = || json!([{"stages": ["m.login.password"]}]);
    let Some(a) = body_auth else {
        return Err(Error::unauthorized("password required")
            .with("flows", flows())
            .with("params", json!({}))
            .with("session", json!(s.uia.new_session())));
    };
    // Authenticating as someone else (even with their right password) is refused outright, as in Synapse.
    let named = a
        .pointer("/identifier/user")
        .filter(|_| a.pointer("/identifier/type").and_then(Value::as_str) == Some("m.id.user"))
        .or_else(|| a.get("user"))
        .and_then(Value::as_str);
    if let Some(name) = named {
        if local_user_id(s, name).ok().as_deref() != Some(auth.user_id.as_str()) {
            return Err(Error::forbidden("the user in `auth` is not the user making the request"));
        }
    }
    let password = a.get("password").and_then(Value::as_str).unwrap_or("");
    if a.get("type").and_then(Value::as_str) == Some("m.login.password")
        && check_password_limited(s, auth.user_id.as_str(), &auth.ip, password).await?
    {
        return Ok(());
    }
    // A failed stage is answered like the challenge (401, same session) plus an error code, as the spec's
    // user-interactive auth requires.
    let session = a.get("session").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| s.uia.new_session());
    Err(Error::auth_stage_failed("invalid password")
        .with("flows", flows())
        .with("params", json!({}))
        .with("session", json!(session)))
}

#[derive(Deserialize)]
pub struct PasswordChange {
    new_password: String,
    #[serde(default = "default_true")]
    logout_devices: bool,
    auth: Option<Value>,
}

fn default_true() -> bool {
    true
}

pub async fn change_password(
    State(s): State<AppState>,
    auth: Auth,
    Json(req): Json<PasswordChange>,
) -> Result<impl IntoResponse> {
    require_password(&s, &auth, req.auth.as_ref()).await?;
    let p = req.new_password;
    let hash =
        tokio::task::spawn_blocking(move || hash_password(&p)).await.map_err(|e| Error::internal(e.to_string()))??;
    s.store
        .write(move |w| {
            accounts::set_password(w.db(), auth.user_id.as_str(), &hash)?;
            // The spec: pushers set with other access tokens go (whether or not their devices are logged out).
            crate::store::pushers::delete_except_device(w.db(), auth.user_id.as_str(), &auth.device_id)?;
            if req.logout_devices {
                accounts::delete_other_tokens(w.db(), auth.user_id.as_str(), &auth.token)?;
            }
            Ok(())
        })
        .await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct Deactivate {
    auth: Option<Value>,
    /// Erase the profile too (the spec's "as much as possible": Hearth keeps no 3PIDs to erase).
    #[serde(default)]
    erase: bool,
    #[allow(dead_code)]
    id_server: Option<String>,
}

/// `POST /account/deactivate` (password UIA): the account can no longer log in, every device and token goes, account
/// data and key backups are deleted (with `erase`, the profile too), and the user leaves every room, as Synapse
/// does. The id stays taken: it cannot be registered again.
pub async fn deactivate(
    State(s): State<AppState>,
    auth: Auth,
    Json(req): Json<Deactivate>,
) -> Result<impl IntoResponse> {
    require_password(&s, &auth, req.auth.as_ref()).await?;
    deactivate_account(&s, &auth.user_id, req.erase).await?;
    Ok(axum::Json(json!({"id_server_unbind_result": "success"})))
}

/// Deactivates a local account (what `POST /account/deactivate` and `hearth user deactivate` both do): no more
/// logins, every device and token gone (its device list change announced), account data and key backups deleted
/// (with `erase`, the profile too), presence offline, and the user leaves every room. Safe to run again on an
/// account already (partly) deactivated.
pub async fn deactivate_account(s: &AppState, user_id: &ruma::UserId, erase: bool) -> Result<()> {
    let (uid, erase_) = (user_id.to_string(), erase);
    s.store
        .write(move |w| {
            if accounts::deactivate(w.db(), &uid, erase_)? > 0 {
                e2ee::device_list_changed(w, &uid)?;
            }
            crate::store::account_data::delete_all(w.db(), &uid)?;
            crate::store::room_keys::delete_all(w.db(), &uid)?;
            Ok(())
        })
        .await?;
    tracing::info!(%user_id, erase, "account deactivated");
    let offline = crate::room::presence::Change::Set { state: "offline".into(), status_msg: None };
    if let Err(e) = s.presence.update(&s.store, user_id.as_str(), offline).await {
        tracing::warn!(error = %e, "presence not cleared on deactivation");
    }
    crate::client::rooms::leave_all(s, user_id).await;
    Ok(())
}

// ------------------------------------------------------------------------------------------------------------
// Filters

pub async fn create_filter(
    State(s): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(filter): Json<Value>,
) -> Result<impl IntoResponse> {
    if user_id != auth.user_id {
        return Err(Error::forbidden("cannot create filters for other users"));
    }
    if !filter.is_object() {
        return Err(Error::bad_json("filter must be an object"));
    }
    crate::client::sync::Filter::parse(&filter)?;
    // `null` means "not set": stored without it, so the filter reads back in the spec's shape.
    fn strip_nulls(v: &mut Value) {
        if let Some(o) = v.as_object_mut() {
            o.retain(|_, x| !x.is_null());
            o.values_mut().for_each(strip_nulls);
        }
    }
    let mut filter = filter;
    strip_nulls(&mut filter);
    let json = filter.to_string();
    let id = s.store.write(move |w| accounts::create_filter(w.db(), auth.user_id.as_str(), &json)).await?;
    Ok(axum::Json(json!({"filter_id": id.to_string()})))
}

pub async fn get_filter(
    State(s): State<AppState>,
    auth: Auth,
    Path((user_id, filter_id)): Path<(String, String)>,
) -> Result<impl IntoResponse> {
    if user_id != auth.user_id {
        return Err(Error::forbidden("cannot read other users' filters"));
    }
    let id: i64 = filter_id.parse().map_err(|_| Error::not_found("no such filter"))?;
    let json = s
        .store
        .read(move |c| accounts::get_filter(c, auth.user_id.as_str(), id))
        .await?
        .ok_or_else(|| Error::not_found("no such filter"))?;
    Ok(axum::Json(serde_json::from_str::<Value>(&json)?))
}

// ------------------------------------------------------------------------------------------------------------
// Devices

/// A device as `/devices` shows it; unknown optional fields are left out (the spec has no `null` for them).
fn device_json(user_id: &str, d: &accounts::DeviceRow) -> Value {
    let mut v = json!({"user_id": user_id, "device_id": d.device_id, "display_name": d.display_name,
                       "last_seen_ts": d.last_seen_ts, "last_seen_ip": d.last_seen_ip});
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    v
}

pub async fn list_devices(State(s): State<AppState>, auth: Auth) -> Result<impl IntoResponse> {
    let uid = auth.user_id.clone();
    let devices = s.store.read(move |c| accounts::list_devices(c, uid.as_str())).await?;
    Ok(axum::Json(
        json!({"devices": devices.iter().map(|d| device_json(auth.user_id.as_str(), d)).collect::<Vec<_>>()}),
    ))
}

pub async fn get_device(
    State(s): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
) -> Result<impl IntoResponse> {
    let uid = auth.user_id.clone();
    let devices = s.store.read(move |c| accounts::list_devices(c, uid.as_str())).await?;
    let d = devices.iter().find(|d| d.device_id == device_id).ok_or_else(|| Error::not_found("no such device"))?;
    Ok(axum::Json(device_json(auth.user_id.as_str(), d)))
}

#[derive(Deserialize)]
pub struct DeviceUpdate {
    display_name: Option<String>,
}

pub async fn update_device(
    State(s): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
    Json(req): Json<DeviceUpdate>,
) -> Result<impl IntoResponse> {
    let (federating, our_server) = (s.federation.is_some(), s.identity.server_name.to_string());
    let found = s
        .store
        .write(move |w| {
            let found =
                accounts::update_device(w.db(), auth.user_id.as_str(), &device_id, req.display_name.as_deref())?;
            // A new display name is a device list change (as in Synapse): the user's other clients and the
            // servers sharing a room with them (for partial-state rooms, those named in `servers_in_room`) hear
            // of it.
            if found && req.display_name.is_some() {
                let pos = crate::store::e2ee::device_list_changed(w, auth.user_id.as_str())?;
                if federating {
                    crate::client::keys::announce_keys(
                        w.db(),
                        &our_server,
                        auth.user_id.as_str(),
                        Some(&device_id),
                        pos,
                    )?;
                }
            }
            Ok(found)
        })
        .await?;
    if !found {
        return Err(Error::not_found("no such device"));
    }
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct AuthOnly {
    auth: Option<Value>,
}

pub async fn delete_device(
    State(s): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
    Json(req): Json<AuthOnly>,
) -> Result<impl IntoResponse> {
    require_password(&s, &auth, req.auth.as_ref()).await?;
    let found = delete_devices_now(&s, auth.user_id.as_str(), vec![device_id]).await?;
    if found == 0 {
        return Err(Error::not_found("no such device"));
    }
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteDevices {
    devices: Vec<String>,
    auth: Option<Value>,
}

pub async fn delete_devices(
    State(s): State<AppState>,
    auth: Auth,
    Json(req): Json<DeleteDevices>,
) -> Result<impl IntoResponse> {
    require_password(&s, &auth, req.auth.as_ref()).await?;
    delete_devices_now(&s, auth.user_id.as_str(), req.devices).await?;
    Ok(axum::Json(json!({})))
}

async fn delete_devices_now(s: &AppState, user_id: &str, devices: Vec<String>) -> Result<usize> {
    let uid = user_id.to_owned();
    s.store
        .write(move |w| {
            let mut n = 0;
            for d in &devices {
                if accounts::delete_device(w.db(), &uid, d)? {
                    n += 1;
                }
            }
            if n > 0 {
                e2ee::device_list_changed(w, &uid)?;
            }
            Ok(n)
        })
        .await
}
