//! The `hearth` command: serve, manage users, print an example config.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use hearth::config::Config;

#[derive(Parser)]
#[command(name = "hearth", version, about = "A Matrix homeserver in one binary and one SQLite file")]
struct Cli {
    /// Configuration file (default: ./hearth.toml if present).
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage local users.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Show background jobs (lazy-join resyncs) and their progress; `--watch` refreshes every second.
    Jobs {
        #[arg(long)]
        watch: bool,
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
    /// Checks the backup, refuses while a server answers on `listen.client`, moves an existing database aside
    /// (only with --force) and copies the backup in.
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

#[derive(Subcommand)]
enum UserAction {
    /// Create a user.
    Create {
        name: String,
        #[arg(long)]
        password: String,
        #[arg(long)]
        admin: bool,
    },
    /// Set a new password for a user (and log out all their sessions).
    ResetPassword {
        name: String,
        #[arg(long)]
        password: String,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print a commented example configuration with every key.
    Example,
    /// Validate the configuration (`-c FILE`, else ./hearth.toml, plus HEARTH_* variables) without starting;
    /// exits non-zero naming the offending key.
    Check,
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Config { action: ConfigAction::Example }) = &cli.command {
        print!("{}", hearth::config::EXAMPLE);
        return;
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hearth: {e:#}");
            std::process::exit(2);
        }
    };
    if let Some(Command::Config { action: ConfigAction::Check }) = &cli.command {
        std::process::exit(config_check(&config, cli.config.as_deref()));
    }
    init_logging(&config);
    let result = match cli.command {
        None | Some(Command::Serve) => serve(config),
        Some(Command::User { action }) => user_command(config, action),
        Some(Command::Jobs { watch }) => jobs_command(config, watch),
        Some(Command::Keys { action: KeysAction::Rotate }) => rotate_keys(config),
        Some(Command::Backup { file, force }) => backup_command(&config, &file, force),
        Some(Command::Restore { file, force }) => restore_command(&config, &file, force),
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
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).log_internal_errors(false);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// glibc raises its mmap threshold each time a large mmapped block is freed; from then on big short-lived buffers
/// (argon2's 19 MiB per password hash, large federation answers) come from the heap arenas and stay resident after
/// they are freed. Measured: 100 registrations, 16 at a time, left the server at 1.5 GB RSS (16 MB with this).
/// A fixed threshold keeps allocations of 1 MiB and more mmapped, so freeing them returns the memory.
///
/// glibc also gives threads up to 8 arenas per core; SQLite reads and signature checks run on many blocking threads,
/// and each arena keeps its own freed memory. Four arenas (unless `MALLOC_ARENA_MAX` says otherwise): in single
/// runs of the 100k-member lazy join on this 2-core machine (`hearth-bench join --members 100000`, the variable set
/// by hand) peak RSS was 163 MB with 4 arenas against 201-240 MB with glibc's 16; 2 arenas spent 15% of the CPU
/// samples waiting on the arena locks and made the resync 20-40% slower.
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

fn serve(config: Config) -> anyhow::Result<()> {
    tune_allocator();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let running = hearth::server::start(config).await?;
        // Listeners are bound: `systemctl start` returns now (Type=notify).
        hearth::server::sd_notify(&format!("READY=1\nSTATUS=serving on {}", running.client_addr));
        shutdown_signal().await;
        tracing::info!("shutting down");
        hearth::server::sd_notify("STOPPING=1\nSTATUS=shutting down");
        running.stop().await;
        Ok(())
    })
}

/// `hearth config check`: the configuration loaded (that already named any bad key); now the checks that need
/// the file system. Returns the exit code.
fn config_check(config: &Config, file: Option<&std::path::Path>) -> i32 {
    let source = match file {
        Some(f) => f.display().to_string(),
        None if std::path::Path::new("hearth.toml").exists() => "./hearth.toml".into(),
        None => "built-in defaults".into(),
    };
    let (errors, warnings) = config.check_environment();
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    for e in &errors {
        eprintln!("hearth: invalid configuration: {e}");
    }
    if !errors.is_empty() {
        return 2;
    }
    println!(
        "configuration OK ({source}): server_name {}, client API on {}, federation listener {}, database {}, metrics {}",
        config.server_name,
        config.listen.client,
        config.listen.federation.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        config.database.path.display(),
        if config.metrics.enabled { "on" } else { "off" },
    );
    0
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

fn user_command(config: Config, action: UserAction) -> anyhow::Result<()> {
    use hearth::client::account::{hash_password, validate_localpart};
    use hearth::store::accounts;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let services = hearth::server::build_services(config)?;
    let server = services.identity.server_name.to_string();
    let to_id = |name: &str| -> anyhow::Result<String> {
        let local = name.trim_start_matches('@').split(':').next().unwrap_or("").to_lowercase();
        validate_localpart(&local, &server).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(format!("@{local}:{server}"))
    };
    rt.block_on(async {
        match action {
            UserAction::Create { name, password, admin } => {
                let user_id = to_id(&name)?;
                let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
                let uid = user_id.clone();
                let created =
                    services.store.write(move |w| accounts::insert_user(w.db(), &uid, Some(&hash), admin)).await?;
                anyhow::ensure!(created, "user {user_id} already exists");
                println!("created {user_id}{}", if admin { " (admin)" } else { "" });
            }
            UserAction::ResetPassword { name, password } => {
                let user_id = to_id(&name)?;
                let hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
                let uid = user_id.clone();
                let found = services
                    .store
                    .write(move |w| {
                        let found = accounts::set_password(w.db(), &uid, &hash)?;
                        accounts::delete_all_tokens(w.db(), &uid)?;
                        Ok(found)
                    })
                    .await?;
                anyhow::ensure!(found, "no such user {user_id}");
                println!("password reset for {user_id}; all sessions logged out");
            }
        }
        Ok(())
    })
}

/// Reads the job table of the configured database (works while the server runs: WAL readers do not block it).
fn jobs_command(config: Config, watch: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let direct = hearth::store::DirectDb::open_read_only(&config.database.path)?;
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

fn rotate_keys(config: Config) -> anyhow::Result<()> {
    let direct = hearth::store::DirectDb::open(&config.database.path)?;
    let identity = hearth::room::Identity::load_or_create(direct.db(), &config.server_name)?;
    let new = hearth::federation::keys::rotate_own_key(direct.db(), &identity).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "retired {} (still published in old_verify_keys); new key {new} is used from the next start",
        identity.key_id
    );
    Ok(())
}
