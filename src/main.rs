//! The `hearth` command: serve, manage users, print an example config.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use hearth::config::Config;

#[derive(Parser)]
#[command(name = "hearth", version, about = "A Matrix homeserver in one binary and one SQLite file")]
struct Cli {
    /// Configuration file (default: ./hearth.toml if present).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    /// The server name (your domain, the part after `:` in user ids); overrides `server_name` of the configuration.
    #[arg(long, global = true, value_name = "NAME")]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage local users (works while the server runs).
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// List, purge and block rooms (works while the server runs).
    Room {
        #[command(subcommand)]
        action: RoomAction,
    },
    /// The cache of other servers' media (works while the server runs).
    Media {
        #[command(subcommand)]
        action: MediaAction,
    },
    /// Registration tokens (`m.login.registration_token`; works while the server runs).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// Content reports users sent (works while the server runs).
    Report {
        #[command(subcommand)]
        action: ReportAction,
    },
    /// Show background jobs (lazy-join resyncs) and their progress; `--watch` refreshes every second.
    Jobs {
        #[arg(long)]
        watch: bool,
    },
    /// Application services (bridges): `list` the registered ones, `check FILE` a registration file.
    Appservice {
        #[command(subcommand)]
        action: AppserviceAction,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Signing keys: `hearth keys rotate` retires the current key (still published as an old verify key) and
    /// makes a new one, used from the next start.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Write a consistent copy of the database to FILE (safe while the server runs).
    Backup {
        file: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Put a backup in place as the configured database. Stop the server first.
    ///
    /// Checks the backup, refuses while a server runs on the database or answers on `listen.client`, moves an
    /// existing database aside (only with --force) and copies the backup in.
    Restore {
        file: PathBuf,
        /// Move an existing database aside instead of refusing.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum KeysAction {
    /// Retire the current signing key and generate a new one (restart the server afterwards).
    Rotate,
}

/// Where a password comes from: `--password`, `--password-file`, else a prompt (or one line of stdin when it is
/// not a terminal).
#[derive(clap::Args)]
struct PasswordArgs {
    /// The password (visible in the process list and shell history: prefer the prompt or --password-file).
    #[arg(long, conflicts_with = "password_file")]
    password: Option<String>,
    /// Read the password from the first line of FILE.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserAction {
    /// Create a local user: NAME is `alice` or `@alice:your.server`. Prompts for the password unless given.
    Create {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// Make the user a server admin.
        #[arg(long)]
        admin: bool,
    },
    /// List local users (admin, deactivated, devices, created).
    List,
    /// Deactivate a user as `POST /account/deactivate` does: no more logins, sessions and devices gone, every
    /// room left. The id stays taken.
    Deactivate {
        name: String,
        /// Also erase the profile (display name, avatar).
        #[arg(long)]
        erase: bool,
    },
    /// Make a user a server admin (`true`) or not (`false`).
    SetAdmin {
        name: String,
        #[arg(action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
        admin: bool,
    },
    /// Set a new password for a user (and log out all their sessions). Prompts for it unless given.
    ResetPassword {
        name: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
}

#[derive(Subcommand)]
enum RoomAction {
    /// List rooms: id, members, local members, partial state (lazy join still syncing), blocked, name.
    List,
    /// Delete a room's events and state from the database, once no local user is in it any more.
    Purge {
        /// `!room:server` (or a local `#alias:server`).
        room: String,
    },
    /// Block a room: local users can no longer join it, other servers cannot join or invite through us.
    Block {
        room: String,
        /// Lift the block instead.
        #[arg(long)]
        unblock: bool,
    },
    /// Lift a block (the same as `room block ROOM --unblock`).
    Unblock { room: String },
}

#[derive(Subcommand)]
enum MediaAction {
    /// Delete cached copies of other servers' media cached longer ago than `--older-than` (local uploads stay;
    /// remote files are fetched again when asked for).
    Purge {
        /// e.g. 30d, 12h, 2w.
        #[arg(long, value_name = "AGE")]
        older_than: String,
    },
}

#[derive(Subcommand)]
enum ReportAction {
    /// List the newest reports (events, rooms and users), newest first.
    List {
        /// How many to show.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

#[derive(Subcommand)]
enum TokenAction {
    /// Make a registration token; the token is printed on the last line.
    Create {
        /// How many accounts it may register (default: unlimited).
        #[arg(long, value_name = "N")]
        uses: Option<i64>,
        /// Expire after this long, e.g. 7d, 12h (default: never).
        #[arg(long, value_name = "AGE")]
        expires: Option<String>,
        /// Use this token instead of a random one.
        #[arg(long)]
        token: Option<String>,
    },
    /// List registration tokens with their uses and expiry.
    List,
    /// Delete a registration token.
    Revoke { token: String },
}

#[derive(Subcommand)]
enum AppserviceAction {
    /// The registrations of `appservice.registration_files`, with their waiting transactions.
    List,
    /// Check a registration file (alone and beside the configured ones) without starting the server.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print a commented example configuration with every key.
    Example,
    /// Validate the configuration (`-c FILE`, else ./hearth.toml, plus HEARTH_* variables) without starting;
    /// exits non-zero naming the offending key.
    Check,
}

/// Rust's allocations go to mimalloc. With glibc's malloc a tenth of a 100k-member resync's CPU went to the
/// allocator, much of it in free-list upkeep (`malloc_consolidate`, `unlink_chunk`); with mimalloc the resync took
/// 9-13% less CPU and wall time at the same peak RSS (`bench/PROFILE.md`, round 8). SQLite allocates through
/// glibc still ([`tune_allocator`]).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tune_mimalloc();
    let cli = Cli::parse();
    if let Some(Command::Config { action: ConfigAction::Example }) = &cli.command {
        print!("{}", hearth::config::EXAMPLE);
        return;
    }
    let source = hearth::config::source_name(cli.config.as_deref());
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearth: {e:#}");
            std::process::exit(2);
        }
    };
    if let Some(name) = &cli.server_name {
        if let Err(e) = ruma::ServerName::parse(name) {
            eprintln!("hearth: --server-name {name}: {e}");
            std::process::exit(2);
        }
        config.server_name = name.clone();
    }
    let serving_or_checking =
        matches!(cli.command, None | Some(Command::Serve) | Some(Command::Config { action: ConfigAction::Check }));
    if serving_or_checking
        && config.server_name.is_empty()
        && cli.config.is_none()
        && !Path::new("hearth.toml").exists()
    {
        // No configuration at all (no -c FILE, no ./hearth.toml, no HEARTH_SERVER_NAME, no --server-name): a local
        // try-out as `localhost` on loopback, so that a bare `cargo run --release` serves at once. A configuration
        // file without a server name (the packaged one) is still refused, naming the key and the file. Management
        // commands take the name the database records.
        config.server_name = "localhost".into();
        eprintln!(
            "hearth: no configuration: serving `localhost` on loopback to try Hearth out (user ids @name:localhost; \
             the name is fixed once the database exists). For a real server pass `--server-name example.org` or set \
             server_name in ./hearth.toml."
        );
    }
    if let Some(Command::Config { action: ConfigAction::Check }) = &cli.command {
        std::process::exit(config_check(&config, &source, cli.config.as_deref()));
    }
    init_logging(&config);
    if !matches!(cli.command, None | Some(Command::Serve)) {
        // A command's output piped into `head` or `grep -q` ends quietly when the reader goes, as other tools do
        // (Rust ignores SIGPIPE, which makes printing panic). The server keeps ignoring it: its sockets report EPIPE.
        // SAFETY: restores the default disposition of one signal before any other thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        None | Some(Command::Serve) => serve(config, &source, cli.config.as_deref()),
        Some(Command::User { action }) => user_command(&config, &source, action),
        Some(Command::Room { action }) => room_command(&config, &source, action),
        Some(Command::Media { action: MediaAction::Purge { older_than } }) => {
            media_purge(&config, &source, &older_than)
        }
        Some(Command::Token { action }) => token_command(&config, &source, action),
        Some(Command::Report { action: ReportAction::List { limit } }) => {
            let reports = admin(&config, &source).and_then(|a| a.list_reports(limit));
            reports.map(|reports| {
                for r in &reports {
                    println!("{}", hearth::admin::reports::report_line(r));
                }
                println!("{} reports", reports.len());
            })
        }
        Some(Command::Jobs { watch }) => jobs_command(config, &source, watch),
        Some(Command::Keys { action: KeysAction::Rotate }) => rotate_keys(config, &source),
        Some(Command::Backup { file, force }) => backup_command(&config, &file, force),
        Some(Command::Restore { file, force }) => restore_command(&config, &file, force),
        Some(Command::Appservice { action }) => appservice_command(&config, &source, action),
        Some(Command::Config { .. }) => Ok(()),
    };
    if let Err(e) = result {
        eprintln!("hearth: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (disk full under a redirected stderr) is dropped: tracing-subscriber would
    // otherwise report it with `eprintln!`, which panics on the same error and kills whichever thread logged (the
    // database writer among them).
    // Colour codes only for a person at a terminal (journald and log files would keep them as text).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// glibc's malloc still serves SQLite (its page caches and statements). glibc raises its mmap threshold each time
/// a large mmapped block is freed; from then on big short-lived buffers come from the heap arenas and stay resident
/// after they are freed. (Measured while Rust's allocations went through glibc too: 100 registrations, 16 at a
/// time, left the server at 1.5 GB RSS with argon2's 19 MiB per hash, 16 MB with this.) A fixed threshold keeps
/// allocations of 1 MiB and more mmapped, so freeing them returns the memory.
///
/// glibc also gives threads up to 8 arenas per core, and SQLite reads run on many threads, each arena keeping its
/// own freed memory. Four arenas (unless `MALLOC_ARENA_MAX` says otherwise): in single runs of the 100k-member lazy
/// join on this 2-core machine (`hearth-bench join --members 100000`, before mimalloc) peak RSS was 163 MB with 4
/// arenas against 201-240 MB with glibc's 16; 2 arenas spent 15% of the CPU samples waiting on the arena locks.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called once at start, before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(libc::M_ARENA_MAX, 4);
        }
    }
}

/// mimalloc returns freed pages to the system at once instead of 10-100 ms later: the resync frees as fast as it
/// allocates, and with the delay the 10k-member join peaked higher. `MIMALLOC_PURGE_DELAY` still overrides. (The
/// `no_thp` feature keeps mimalloc from asking for transparent huge pages: with them each touched 2 MB region was
/// resident whole, and the 10k join peaked at 73-92 MB instead of 48-50 MB.)
fn tune_mimalloc() {
    // The position of `mi_option_purge_delay` in mimalloc v2's `mi_option_e` (include/mimalloc.h); the `v2`
    // feature pins that header.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option, which mimalloc reads at each purge; no pointers involved.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) };
    }
}

/// Runs the server. One server per database (the lock); a start that fails leaves no new files behind.
fn serve(config: Config, source: &str, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    config.require_server_name(source)?;
    tune_allocator();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let created = NewFiles::before_start(&config);
    let lock = hearth::store::lock::DbLock::acquire(&config.database.path)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async {
        let running = match hearth::server::start(config).await {
            Ok(r) => r,
            Err(e) => {
                created.remove();
                return Err(e);
            }
        };
        // Listeners are bound: `systemctl start` returns now (Type=notify).
        hearth::server::sd_notify(&format!("READY=1\nSTATUS=serving on {}", running.client_addr));
        print_first_steps(&running, file).await;
        shutdown_signal().await;
        tracing::info!("shutting down");
        hearth::server::sd_notify("STOPPING=1\nSTATUS=shutting down");
        running.stop().await;
        Ok(())
    });
    drop(lock);
    result
}

/// The files a first start creates (the database, its `-wal`/`-shm`, the media folder), noted before it so a failed
/// start can remove what it made.
struct NewFiles(Vec<PathBuf>);

impl NewFiles {
    fn before_start(config: &Config) -> NewFiles {
        let db = &config.database.path;
        if db.exists() {
            // Not a first start: everything there belongs to the existing database.
            return NewFiles(Vec::new());
        }
        let mut candidates: Vec<PathBuf> =
            ["", "-wal", "-shm", "-journal"].iter().map(|s| PathBuf::from(format!("{}{s}", db.display()))).collect();
        candidates.push(config.media.dir(db));
        NewFiles(candidates.into_iter().filter(|p| !p.exists()).collect())
    }

    fn remove(&self) {
        for p in &self.0 {
            let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
        }
    }
}

/// On a server without users: where it listens and how to make the first user.
async fn print_first_steps(running: &hearth::server::Running, file: Option<&std::path::Path>) {
    let users = running.services.store.read(hearth::store::maintenance::user_count).await.unwrap_or(1);
    if users > 0 {
        return;
    }
    let c = file.map(|f| format!(" -c {}", f.display())).unwrap_or_default();
    eprintln!(
        "\nhearth: serving {name} on http://{addr} (no users yet). Next:\n  \
         1. create the first user (an admin):  hearth{c} user create alice --admin\n  \
         2. log in with a Matrix client (Element: https://app.element.io) at http://{addr}\n     \
            (for other people and servers, put a TLS reverse proxy in front: see the README)\n",
        name = running.services.identity.server_name,
        addr = running.client_addr,
    );
}

/// `hearth config check`: the configuration loaded (that already named any bad key); now the checks that need
/// the file system. Returns the exit code.
fn config_check(config: &Config, source: &str, file: Option<&std::path::Path>) -> i32 {
    let (mut errors, warnings) = config.check_environment();
    if let Err(e) = hearth::appservice::Registry::load(&config.appservice.registration_files, &config.server_name) {
        errors.push(format!("key `appservice.registration_files`: {e}"));
    }
    if let Err(e) = config.require_server_name(source) {
        errors.insert(0, format!("key `server_name`: {e}"));
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    for e in &errors {
        eprintln!("hearth: invalid configuration: {e}");
    }
    if !errors.is_empty() {
        return 2;
    }
    let from =
        if file.is_none() && !std::path::Path::new("hearth.toml").exists() { "built-in defaults" } else { source };
    println!(
        "configuration OK ({from}): server_name {}, client API on {}, federation listener {}, database {}, metrics {}",
        config.server_name,
        config.listen.client,
        config.listen.federation.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        config.database.path.display(),
        if config.metrics.enabled { "on" } else { "off" },
    );
    0
}

fn appservice_command(config: &Config, source: &str, action: AppserviceAction) -> anyhow::Result<()> {
    use hearth::appservice::{self, Registry};
    let server_name = if config.server_name.is_empty() { "<server_name>" } else { config.server_name.as_str() };
    let describe = |a: &appservice::AppService| {
        let ns = |list: &[appservice::Namespace]| {
            let v: Vec<String> =
                list.iter().map(|n| format!("{}{}", n.source, if n.exclusive { " (exclusive)" } else { "" })).collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(", ")
            }
        };
        format!(
            "{}: url {}, sender {}, users {}, aliases {}, rooms {}, rate limited {}, ephemeral {}{}",
            a.id,
            a.base_url().unwrap_or("none (no pushes)"),
            a.sender,
            ns(&a.users),
            ns(&a.aliases),
            ns(&a.rooms),
            if a.rate_limited { "yes" } else { "no" },
            if a.receive_ephemeral { "yes" } else { "no" },
            if a.protocols.is_empty() { String::new() } else { format!(", protocols {}", a.protocols.join(" ")) }
        )
    };
    match action {
        AppserviceAction::Check { file } => {
            let a = appservice::load_file(&file, server_name)?;
            let mut files = config.appservice.registration_files.clone();
            if !files.iter().any(|f| f == &file) {
                files.push(file.clone());
            }
            Registry::load(&files, server_name)?;
            println!("registration OK ({}): {}", file.display(), describe(&a));
        }
        AppserviceAction::List => {
            let registry = Registry::load(&config.appservice.registration_files, server_name)?;
            if registry.is_empty() {
                println!("no application services registered (appservice.registration_files in {source})");
            }
            let db = admin(config, source).ok();
            for a in registry.all() {
                let queued = db.as_ref().map(|d| d.appservice_queue(&a.id)).transpose()?.flatten();
                let status = match queued {
                    Some((waiting, failures)) => format!(" [{waiting} transaction(s) waiting, {failures} failure(s)]"),
                    None => String::new(),
                };
                println!("{} ({}){status}", describe(a), a.file.display());
            }
        }
    }
    Ok(())
}

fn backup_command(config: &Config, file: &std::path::Path, force: bool) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let s = hearth::store::backup::backup(&config.database.path, file, force)?;
    println!(
        "backed up {} to {} ({} bytes, {} events, {} users, server_name {}) in {:.1} s",
        config.database.path.display(),
        s.path.display(),
        s.bytes,
        s.events,
        s.users,
        s.server_name.as_deref().unwrap_or("?"),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn restore_command(config: &Config, file: &std::path::Path, force: bool) -> anyhow::Result<()> {
    // A server still running on this database would keep writing to the file we replace.
    let mut probe = config.listen.client;
    if probe.ip().is_unspecified() {
        probe.set_ip(if probe.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    if std::net::TcpStream::connect_timeout(&probe, std::time::Duration::from_millis(500)).is_ok() {
        anyhow::bail!(
            "something is listening on {probe} (listen.client): stop the server first (systemctl stop hearth)"
        );
    }
    if let Some(pid) = hearth::store::lock::holder(&config.database.path) {
        anyhow::bail!("a hearth server (pid {pid}) runs on {}: stop it first", config.database.path.display());
    }
    let s = hearth::store::backup::restore(file, &config.database.path, &config.server_name, force)?;
    println!(
        "restored {} to {} ({} events, {} users); start the server again",
        file.display(),
        s.path.display(),
        s.events,
        s.users
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn admin(config: &Config, source: &str) -> anyhow::Result<hearth::admin::Admin> {
    hearth::admin::Admin::open(config, source)
}

/// The password of `user create` / `user reset-password`.
fn password(args: PasswordArgs, confirm: bool) -> anyhow::Result<String> {
    if let Some(p) = args.password {
        return Ok(p);
    }
    if let Some(f) = args.password_file {
        let text = std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("--password-file {}: {e}", f.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_owned());
    }
    let first = prompt_password("Password: ")?;
    if confirm && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        anyhow::ensure!(prompt_password("Again: ")? == first, "the passwords differ");
    }
    Ok(first)
}

/// Reads a line from stdin without echo when it is a terminal (else one plain line, for scripts).
fn prompt_password(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut saved: Option<libc::termios> = None;
    if tty {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        // SAFETY: tcgetattr/tcsetattr on stdin's descriptor with a termios we own; echo is restored below.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) == 0 {
                saved = Some(t);
                t.c_lflag &= !libc::ECHO;
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        // SAFETY: as above, restoring the saved settings.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        eprintln!();
    }
    anyhow::ensure!(read? > 0, "no password given (stdin is closed): use --password-file FILE or --password");
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

fn user_command(config: &Config, source: &str, action: UserAction) -> anyhow::Result<()> {
    let mut a = admin(config, source)?;
    match action {
        UserAction::Create { name, password: p, admin } => {
            a.user_id(&name)?; // a bad name fails before the prompt
            let user_id = a.create_user(&name, &password(p, true)?, admin)?;
            println!("created {user_id}{}", if admin { " (admin)" } else { "" });
        }
        UserAction::List => {
            let users = a.list_users()?;
            println!("{:<40} {:<6} {:<12} {:>7}  CREATED", "USER", "ADMIN", "DEACTIVATED", "DEVICES");
            for u in &users {
                println!(
                    "{:<40} {:<6} {:<12} {:>7}  {}",
                    u.user_id,
                    if u.admin { "yes" } else { "no" },
                    if u.deactivated { "yes" } else { "no" },
                    u.devices,
                    hearth::admin::format_ts(u.created_ts)
                );
            }
            println!("{} users", users.len());
        }
        UserAction::Deactivate { name, erase } => {
            let (user_id, finished) = a.deactivate(&name, erase, std::time::Duration::from_secs(60))?;
            if finished {
                println!("deactivated {user_id}: logged out, devices deleted, left every room");
            } else if let Some(pid) = a.running_server() {
                println!(
                    "deactivated {user_id}: it can no longer log in; the server (pid {pid}) is still finishing \
                     (devices, leaving rooms): see `hearth jobs`"
                );
            } else {
                println!(
                    "deactivated {user_id}: it can no longer log in; its devices are deleted and its rooms left \
                     when the server next starts"
                );
            }
        }
        UserAction::SetAdmin { name, admin } => {
            let user_id = a.set_admin(&name, admin)?;
            println!("{user_id} is {}", if admin { "an admin" } else { "not an admin" });
        }
        UserAction::ResetPassword { name, password: p } => {
            a.user_id(&name)?;
            let user_id = a.reset_password(&name, &password(p, true)?)?;
            println!("password reset for {user_id}; all sessions logged out");
        }
    }
    Ok(())
}

fn room_command(config: &Config, source: &str, action: RoomAction) -> anyhow::Result<()> {
    let mut a = admin(config, source)?;
    match action {
        RoomAction::List => {
            let rooms = a.list_rooms()?;
            println!("{:<48} {:>7} {:>5} {:<8} {:<7} NAME", "ROOM", "MEMBERS", "LOCAL", "PARTIAL", "BLOCKED");
            for r in &rooms {
                let state = if !r.held {
                    "no state"
                } else if r.partial {
                    "yes"
                } else {
                    "no"
                };
                println!(
                    "{:<48} {:>7} {:>5} {:<8} {:<7} {}",
                    r.room_id,
                    r.members,
                    r.local_members,
                    state,
                    if r.blocked { "yes" } else { "no" },
                    r.name.as_deref().unwrap_or("-")
                );
            }
            println!("{} rooms", rooms.len());
        }
        RoomAction::Purge { room } => {
            let p = a.purge_room(&room)?;
            println!("purged {}: {} events, {} state groups", p.room_id, p.events, p.state_groups);
        }
        RoomAction::Block { room, unblock: false } => {
            let (room_id, changed) = a.block_room(&room, true)?;
            println!("{room_id} is blocked{}", if changed { "" } else { " (it was already)" });
        }
        RoomAction::Block { room, unblock: true } | RoomAction::Unblock { room } => {
            let (room_id, changed) = a.block_room(&room, false)?;
            println!("{room_id} is not blocked{}", if changed { " any more" } else { " (it was not)" });
        }
    }
    Ok(())
}

fn media_purge(config: &Config, source: &str, older_than: &str) -> anyhow::Result<()> {
    let age = hearth::admin::parse_duration(older_than).map_err(|e| anyhow::anyhow!("--older-than: {e}"))?;
    let (files, bytes) = admin(config, source)?.purge_remote_media(age)?;
    println!("purged {files} cached remote files ({:.1} MB) cached more than {older_than} ago", bytes as f64 / 1e6);
    Ok(())
}

fn token_command(config: &Config, source: &str, action: TokenAction) -> anyhow::Result<()> {
    let mut a = admin(config, source)?;
    match action {
        TokenAction::Create { uses, expires, token } => {
            let expires = expires
                .map(|e| hearth::admin::parse_duration(&e).map_err(|err| anyhow::anyhow!("--expires: {err}")))
                .transpose()?;
            let t = a.create_token(token, uses, expires)?;
            if !a.registration_takes_tokens() {
                eprintln!(
                    "note: registration does not ask for tokens yet: set `registration.enabled = true` and \
                     `registration.requires_token = true` in {source} and restart the server"
                );
            }
            println!(
                "registration token for {} account(s), {}:",
                t.uses_allowed.map(|n| n.to_string()).unwrap_or_else(|| "any number of".into()),
                t.expiry_ts
                    .map(|e| format!("valid until {}", hearth::admin::format_ts(e)))
                    .unwrap_or("no expiry".into())
            );
            println!("{}", t.token);
        }
        TokenAction::List => {
            let tokens = a.list_tokens()?;
            let now = hearth::store::accounts::now_ms();
            println!("{:<24} {:>6} {:>7} {:<22} VALID", "TOKEN", "USED", "ALLOWED", "EXPIRES");
            for t in &tokens {
                println!(
                    "{:<24} {:>6} {:>7} {:<22} {}",
                    t.token,
                    t.completed,
                    t.uses_allowed.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                    t.expiry_ts.map(hearth::admin::format_ts).unwrap_or_else(|| "never".into()),
                    if t.valid_at(now) { "yes" } else { "no" }
                );
            }
            println!("{} tokens", tokens.len());
        }
        TokenAction::Revoke { token } => {
            a.revoke_token(&token)?;
            println!("revoked {token}");
        }
    }
    Ok(())
}

/// Reads the job table of the configured database (works while the server runs: WAL readers do not block it).
fn jobs_command(config: Config, source: &str, watch: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let direct = admin(&config, source)?.db;
    let tty = std::io::stdout().is_terminal();
    loop {
        let jobs = hearth::jobs::progress(direct.db()).map_err(|e| anyhow::anyhow!("{e}"))?;
        if tty && watch {
            print!("\x1b[2J\x1b[H");
        }
        if jobs.is_empty() {
            println!("no background jobs");
        }
        for j in &jobs {
            let done = j["done"].as_i64().unwrap_or(0);
            let total = j["total"].as_i64();
            let bar = match total {
                Some(t) if t > 0 && tty => {
                    let filled = ((done as f64 / t as f64) * 30.0).round() as usize;
                    format!("[{}{}] ", "#".repeat(filled.min(30)), ".".repeat(30 - filled.min(30)))
                }
                _ => String::new(),
            };
            println!(
                "{} {} {}{}/{} events, {}/s, eta {}s, attempts {}{}",
                j["kind"].as_str().unwrap_or("?"),
                j["room_id"].as_str().unwrap_or("-"),
                bar,
                done,
                total.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                j["rate_per_s"],
                j["eta_s"].as_f64().map(|e| e.to_string()).unwrap_or_else(|| "?".into()),
                j["attempts"],
                j["last_error"].as_str().map(|e| format!(", last error: {e}")).unwrap_or_default(),
            );
        }
        if !watch {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn rotate_keys(config: Config, source: &str) -> anyhow::Result<()> {
    let a = admin(&config, source)?;
    let identity = hearth::room::Identity::load_or_create(a.db.db(), &a.server_name)?;
    let direct = a.db;
    let new = hearth::federation::keys::rotate_own_key(direct.db(), &identity).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "retired {} (still published in old_verify_keys); new key {new} is used from the next start",
        identity.key_id
    );
    Ok(())
}
