//! The packaging files, checked without building a release: the packaged config is the example with the database in
//! /var/lib/hearth and passes `config check`, the systemd unit has its hardening and verifies with
//! `systemd-analyze verify` (when installed), the maintainer scripts create the user and delete data only on purge,
//! and the cargo-deb metadata points at files that exist. (Building and installing the real .deb is
//! `packaging/build-release.sh`, which runs `packaging/test-deb.sh` on both packages: too slow for CI.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::hearth_bin;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn clean_hearth_env(cmd: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HEARTH_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn packaged_config_is_the_example_with_the_state_directory() {
    let out = Command::new("sh").arg(repo().join("packaging/debian/make-config.sh")).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        read("packaging/debian/hearth.toml"),
        "packaging/debian/hearth.toml is stale: run packaging/debian/make-config.sh > packaging/debian/hearth.toml"
    );
    let packaged: hearth::config::Config = toml::from_str(&read("packaging/debian/hearth.toml")).unwrap();
    assert_eq!(packaged.database.path, Path::new("/var/lib/hearth/hearth.db"));
    assert!(
        packaged.listen.client.ip().is_loopback(),
        "the package serves plain HTTP on loopback only (a proxy adds TLS)"
    );

    assert_eq!(packaged.server_name, "", "the package sets no server name: the owner must choose it");

    // Until server_name is set, `config check` fails (and the service refuses to start) naming the key and the file.
    let dir = tempfile::tempdir().unwrap();
    let file = repo().join("packaging/debian/hearth.toml");
    let o = clean_hearth_env(&mut Command::new(hearth_bin()))
        .current_dir(dir.path())
        .args(["-c", file.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("server_name") && err.contains("debian/hearth.toml"), "{err}");
    let o = clean_hearth_env(&mut Command::new(hearth_bin()))
        .current_dir(dir.path())
        .args(["-c", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("server_name") && err.contains("debian/hearth.toml"), "{err}");
    let o = clean_hearth_env(&mut Command::new(hearth_bin()))
        .current_dir(dir.path())
        .env("HEARTH_SERVER_NAME", "example.org")
        .args(["-c", file.to_str().unwrap(), "config", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("/var/lib/hearth/hearth.db"));
}

#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let unit = read("packaging/hearth.service");
    for directive in [
        "Type=notify",
        "ExecStart=/usr/bin/hearth --config /etc/hearth/hearth.toml serve",
        "User=hearth",
        "StateDirectory=hearth",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == directive), "hearth.service lacks `{directive}`");
    }
    assert!(unit.contains("MemoryMax="), "memory guidance for a Pi");

    let verify = Command::new("systemd-analyze").arg("--version").output();
    if !verify.is_ok_and(|o| o.status.success()) {
        eprintln!("systemd-analyze is not installed: skipping `systemd-analyze verify`");
        return;
    }
    // Verify with the test binary in place of /usr/bin/hearth (verify checks that ExecStart exists).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.service");
    std::fs::write(&path, unit.replace("/usr/bin/hearth", hearth_bin())).unwrap();
    let o = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed: {stderr}");
    assert!(!stderr.contains("hearth.service:"), "systemd-analyze verify warns about the unit: {stderr}");
}

/// Runs a maintainer script with its absolute paths moved into `root` and the user-management commands replaced by
/// stubs that log their arguments to `root/calls`.
fn run_script(name: &str, root: &Path, args: &[&str], user_exists: bool) -> String {
    let script = read(&format!("packaging/debian/{name}"))
        .replace("/var/lib/hearth", &root.join("var/lib/hearth").to_string_lossy())
        .replace("/etc/hearth", &root.join("etc/hearth").to_string_lossy());
    let bin = root.join("stub-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let calls = root.join("calls");
    for cmd in ["addgroup", "adduser", "chown", "install", "deluser"] {
        let extra = if cmd == "install" { "mkdir -p \"$(eval echo \\${$#})\"\n" } else { "" };
        std::fs::write(bin.join(cmd), format!("#!/bin/sh\necho \"{cmd} $*\" >> '{}'\n{extra}", calls.display()))
            .unwrap();
    }
    std::fs::write(bin.join("getent"), format!("#!/bin/sh\nexit {}\n", if user_exists { 0 } else { 2 })).unwrap();
    for f in std::fs::read_dir(&bin).unwrap() {
        Command::new("chmod").arg("+x").arg(f.unwrap().path()).status().unwrap();
    }
    let path = root.join(name);
    std::fs::write(&path, script).unwrap();
    let o = Command::new("sh")
        .arg(&path)
        .args(args)
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{name} {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(&calls).unwrap_or_default()
}

#[test]
fn maintainer_scripts_create_the_user_and_delete_data_only_on_purge() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc/hearth")).unwrap();
    std::fs::write(r.join("etc/hearth/hearth.toml"), "").unwrap();

    let calls = run_script("postinst", r, &["configure", ""], false);
    assert!(calls.contains("addgroup --system"), "{calls}");
    assert!(calls.contains("adduser --system") && calls.contains("--ingroup hearth"), "{calls}");
    assert!(calls.contains("chown root:hearth"), "{calls}");
    assert!(r.join("var/lib/hearth").is_dir());
    // An upgrade with the user in place creates nothing and leaves the config's owner alone.
    std::fs::remove_file(r.join("calls")).unwrap();
    let calls = run_script("postinst", r, &["configure", "0.1.0"], true);
    assert!(!calls.contains("adduser") && !calls.contains("chown"), "{calls}");

    std::fs::write(r.join("var/lib/hearth/hearth.db"), "data").unwrap();
    for args in [&["remove"][..], &["upgrade", "0.2.0"], &["disappear"]] {
        run_script("postrm", r, args, true);
        assert!(r.join("var/lib/hearth/hearth.db").exists(), "postrm {args:?} deleted data");
        assert!(r.join("etc/hearth/hearth.toml").exists(), "postrm {args:?} deleted the config");
    }
    run_script("postrm", r, &["purge"], true);
    assert!(!r.join("var/lib/hearth").exists(), "purge deletes the state folder");
    assert!(!r.join("etc/hearth").exists(), "purge deletes the config");

    for s in ["postinst", "postrm"] {
        assert!(
            read(&format!("packaging/debian/{s}")).contains("#DEBHELPER#"),
            "{s} needs the #DEBHELPER# token for cargo-deb"
        );
    }
}

#[test]
fn cargo_deb_metadata_points_at_real_files() {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    assert!(deb["depends"].as_str().unwrap().contains("libc6 (>= 2.31)"));
    assert_eq!(deb["conf-files"].as_array().unwrap()[0].as_str(), Some("/etc/hearth/hearth.toml"));
    let scripts = repo().join(deb["maintainer-scripts"].as_str().unwrap());
    assert!(scripts.join("postinst").exists() && scripts.join("postrm").exists());
    let units = deb["systemd-units"]["unit-scripts"].as_str().unwrap();
    assert!(repo().join(units).join("hearth.service").exists());
    let mut targets = Vec::new();
    for asset in deb["assets"].as_array().unwrap() {
        let a = asset.as_array().unwrap();
        let (src, dest) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
        targets.push(dest.to_owned());
        if !src.starts_with("target/") {
            assert!(repo().join(src).exists(), "asset {src} does not exist");
        }
    }
    for want in ["usr/bin/", "etc/hearth/hearth.toml"] {
        assert!(targets.iter().any(|t| t == want), "no asset installs {want}");
    }
}

/// The real thing when cargo-deb is installed (it is not installed by CI; `packaging/build-release.sh` installs it):
/// a .deb of the test binary (dev profile: a release build takes 10+ minutes) through `packaging/test-deb.sh`, which
/// unpacks it with `dpkg-deb -x` and runs the packaged binary with the packaged config.
#[test]
fn debian_package_unpacks_and_runs() {
    let has = |cmd: &str, arg: &str| Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_deb = Command::new(&cargo).args(["deb", "--version"]).output();
    let cargo_deb_3 =
        cargo_deb.as_ref().is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(" 3."));
    if !cargo_deb_3 || !has("dpkg-deb", "--version") || !has("jq", "--version") || !has("curl", "--version") {
        eprintln!("SKIPPED: needs cargo-deb 3.x, dpkg-deb, jq and curl; run packaging/build-release.sh for the full packaging test");
        return;
    }
    // cargo-deb looks for the binary in <target dir>/debug when asked for the dev profile: the one this test runs.
    let bin = PathBuf::from(hearth_bin());
    let profile_dir = bin.parent().unwrap();
    assert_eq!(profile_dir.file_name().unwrap(), "debug", "{bin:?}");
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(&cargo)
        .args(["deb", "--no-build", "--profile", "dev", "--no-strip", "--fast", "--quiet", "--output"])
        .arg(out.path())
        .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "cargo deb failed: {}", String::from_utf8_lossy(&o.stderr));
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb");
    assert!(
        deb.file_name().unwrap().to_string_lossy().starts_with(&format!("hearth_{}_", env!("CARGO_PKG_VERSION"))),
        "{deb:?}"
    );
    let o = clean_hearth_env(&mut Command::new("bash"))
        .arg(repo().join("packaging/test-deb.sh"))
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "test-deb.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
}
