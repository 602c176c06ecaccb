//! End to end with a real bridge: heisenbridge (an IRC bridge from PyPI, pinned in tests/bridge/requirements.txt)
//! between Hearth and ngircd (Debian's IRC server), all on loopback. The bridge registers its bot and its puppets
//! through Hearth's application service API, a Matrix user's message reaches IRC (read by a tiny raw-socket IRC
//! client here), an IRC message reaches the Matrix room (read through /sync); then the bridge is stopped, messages
//! are sent meanwhile, Hearth restarts, the bridge starts again, and everything arrives once and in order.
//!
//! `.ci/run` installs both (ngircd with apt, heisenbridge into target/bridge-venv).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const AS_TOKEN: &str = "heisenbridge-as-token";
const HS_TOKEN: &str = "heisenbridge-hs-token";
const WAIT: Duration = Duration::from_secs(60);

/// A child process killed when dropped (so a failing test leaves nothing running).
struct Proc(Child, PathBuf);

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
    let out = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    Proc(cmd.spawn().unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")), log)
}

fn heisenbridge_python() -> PathBuf {
    let p = std::env::var_os("HEARTH_TEST_BRIDGE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bridge-venv/bin/python"));
    assert!(p.exists(), "{} missing: run .ci/run (or see tests/README.md)", p.display());
    p
}

fn ngircd(dir: &Path, port: u16) -> Proc {
    let conf = dir.join("ngircd.conf");
    std::fs::write(
        &conf,
        format!(
            "[Global]\nName = irc.hearth.test\nInfo = Hearth bridge test\nListen = 127.0.0.1\nPorts = {port}\n\
             MotdPhrase = hello\n[Limits]\nMaxNickLength = 30\n[Options]\nDNS = no\nIdent = no\nPAM = no\n"
        ),
    )
    .unwrap();
    let bin = ["/usr/sbin/ngircd", "/usr/bin/ngircd"].into_iter().find(|p| Path::new(p).exists()).unwrap_or("ngircd");
    let mut cmd = Command::new(bin);
    cmd.arg("-n").arg("-f").arg(&conf);
    spawn(cmd, dir.join("ngircd.log"))
}

fn heisenbridge(dir: &Path, registration: &Path, port: u16, owner: &str, hearth: &str, n: u32) -> Proc {
    let mut cmd = Command::new(heisenbridge_python());
    cmd.args(["-m", "heisenbridge", "-vv", "-c"]).arg(registration).args([
        "-l",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-o",
        owner,
        hearth,
    ]);
    spawn(cmd, dir.join(format!("heisenbridge-{n}.log")))
}

/// Stands between Hearth and the bridge: while closed, connections are dropped at once (to Hearth the bridge is
/// down). heisenbridge acknowledges transactions as soon as it listens but, until its IRC connection is back, it
/// answers a channel message with a "not connected" notice instead of relaying it; the test opens the gate when
/// the bridge is back on IRC, as an operator would start it before pointing traffic at it.
async fn gate(listen: u16, bridge: u16, open: Arc<AtomicBool>) {
    let l = tokio::net::TcpListener::bind(("127.0.0.1", listen)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else { return };
            if !open.load(Ordering::SeqCst) {
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", bridge)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
}

/// A raw-socket IRC client: every line it receives, in order; answers PINGs.
struct Irc {
    lines: Arc<Mutex<Vec<String>>>,
    /// Lines to send (one writer task owns the socket's write half, the reader's PONGs go through it too).
    out: tokio::sync::mpsc::UnboundedSender<String>,
}

impl Irc {
    async fn connect(port: u16, nick: &str, channel: &str) -> Irc {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (read, mut write) = stream.into_split();
        let (out, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(line) = rx.recv().await {
                if write.write_all(format!("{line}\r\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        });
        let irc = Irc { lines: Default::default(), out: out.clone() };
        let lines = irc.lines.clone();
        tokio::spawn(async move {
            let mut read = BufReader::new(read).lines();
            while let Ok(Some(line)) = read.next_line().await {
                if let Some(arg) = line.strip_prefix("PING ") {
                    let _ = out.send(format!("PONG {arg}"));
                }
                lines.lock().unwrap().push(line);
            }
        });
        irc.send(&format!("NICK {nick}")).await;
        irc.send(&format!("USER {nick} 0 * :{nick}")).await;
        irc.wait("the IRC welcome", |l| l.split(' ').nth(1) == Some("001")).await;
        irc.send(&format!("JOIN {channel}")).await;
        irc.wait("our IRC join", |l| l.contains(" JOIN ") && l.starts_with(&format!(":{nick}!"))).await;
        irc
    }

    async fn send(&self, line: &str) {
        self.out.send(line.to_owned()).unwrap();
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    async fn wait(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        wait_until(&format!("{what} on IRC"), WAIT, || {
            let found = self.lines().into_iter().find(|l| f(l));
            std::future::ready(found)
        })
        .await
    }

    /// The texts of the PRIVMSGs to `channel` seen so far, in order.
    fn said(&self, channel: &str) -> Vec<String> {
        let prefix = format!(" PRIVMSG {channel} :");
        self.lines().iter().filter_map(|l| l.split_once(&prefix).map(|(_, t)| t.to_owned())).collect()
    }
}

/// The owner's view through /sync: every timeline event and invite seen so far.
struct Syncer {
    client: Client,
    since: Option<String>,
    timeline: Vec<(String, Value)>,
    invites: Vec<(String, Value)>,
}

impl Syncer {
    async fn poll(&mut self) {
        let r = self.client.sync(self.since.as_deref(), &[("timeout", "500")]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        self.since = r.body["next_batch"].as_str().map(str::to_owned);
        if let Some(rooms) = r.body["rooms"]["join"].as_object() {
            for (room, v) in rooms {
                for ev in v["timeline"]["events"].as_array().into_iter().flatten() {
                    self.timeline.push((room.clone(), ev.clone()));
                }
            }
        }
        if let Some(rooms) = r.body["rooms"]["invite"].as_object() {
            for (room, v) in rooms {
                self.invites.push((room.clone(), v.clone()));
            }
        }
    }

    async fn until<T>(&mut self, what: &str, f: impl Fn(&Syncer) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what} in /sync");
            self.poll().await;
        }
    }

    /// Waits for an invite from `inviter` to a room not seen before, joins it and returns its id.
    async fn accept_invite(&mut self, inviter: &str, known: &[String]) -> String {
        let room = self
            .until(&format!("an invite from {inviter}"), |s| {
                s.invites
                    .iter()
                    .find(|(r, v)| {
                        !known.contains(r)
                            && v["invite_state"]["events"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|e| e["sender"] == inviter)
                    })
                    .map(|(r, _)| r.clone())
            })
            .await;
        let r = self.client.join(&room).await;
        assert_eq!(r.status, 200, "joining {room}: {}", r.text);
        room
    }

    /// The bodies of the `m.room.message` events in `room` from senders matching `from`, in order.
    fn bodies(&self, room: &str, from: impl Fn(&str) -> bool) -> Vec<String> {
        self.timeline
            .iter()
            .filter(|(r, e)| r == room && e["type"] == "m.room.message" && e["sender"].as_str().is_some_and(&from))
            .filter_map(|(_, e)| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    }

    async fn wait_body(&mut self, room: &str, body: &str, from: impl Fn(&str) -> bool + Copy) {
        let r = room.to_owned();
        self.until(&format!("{body:?} in {room}"), |s| s.bodies(&r, from).iter().any(|b| b == body).then_some(())).await
    }
}

fn config(c: &mut hearth::config::Config, port: u16, registration: &Path) {
    c.listen.client = format!("127.0.0.1:{port}").parse().unwrap();
    c.appservice.registration_files = vec![registration.to_path_buf()];
    c.appservice.retry_base_ms = 100;
    c.appservice.retry_max_ms = 1000;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs ngircd and heisenbridge (target/bridge-venv); see tests/README"]
async fn heisenbridge_bridges_irc_both_ways_across_an_outage_and_a_restart() {
    init_crypto();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (irc_port, bridge_port, gate_port, hearth_port) = (free_port(), free_port(), free_port(), free_port());
    let _ircd = ngircd(d, irc_port);
    let registration = d.join("heisenbridge.yaml");
    std::fs::write(
        &registration,
        format!(
            "id: heisenbridge\nurl: http://127.0.0.1:{gate_port}\nas_token: {AS_TOKEN}\nhs_token: {HS_TOKEN}\n\
             rate_limited: false\nsender_localpart: heisenbridge\nnamespaces:\n  users:\n  - regex: '@irc_.*'\n    \
             exclusive: true\n  aliases: []\n  rooms: []\n"
        ),
    )
    .unwrap();
    let open = Arc::new(AtomicBool::new(true));
    gate(gate_port, bridge_port, open.clone()).await;

    let server = TestServer::start_with(|c| config(c, hearth_port, &registration)).await;
    let hearth_url = server.base_url.clone();
    let owner = server.user("owner").await;
    let owner_id = owner.user_id.clone();
    let bot = server.user_id("heisenbridge");
    let puppet = |s: &str| s.starts_with("@irc_");
    let mut sync = Syncer { client: owner.clone(), since: None, timeline: vec![], invites: vec![] };

    // The IRC side: a user on #hearth.
    wait_until("ngircd listening", WAIT, || {
        std::future::ready(std::net::TcpStream::connect(("127.0.0.1", irc_port)).ok().map(|_| ()))
    })
    .await;
    let irc = Irc::connect(irc_port, "ircfriend", "#hearth").await;

    // The bridge starts, registers its bot and opens a control room for its owner.
    let mut bridge = heisenbridge(d, &registration, bridge_port, &owner_id, &hearth_url, 1);
    let control = sync.accept_invite(&bot, &[]).await;
    let say = |room: &str, text: &str| {
        let (room, text) = (room.to_owned(), text.to_owned());
        let c = owner.clone();
        async move { c.send_text(&room, &text).await }
    };
    say(&control, "ADDNETWORK hearthnet").await;
    say(&control, &format!("ADDSERVER hearthnet 127.0.0.1 {irc_port}")).await;
    say(&control, "OPEN hearthnet").await;
    let network = sync.accept_invite(&bot, std::slice::from_ref(&control)).await;
    say(&network, "CONNECT").await;
    // The IRC server's welcome (001), relayed by the bridge as a notice: it is on IRC.
    let bot2 = bot.clone();
    sync.until("the IRC welcome in the network room", |s| {
        s.bodies(&network, |u| u == bot2).iter().any(|b| b.contains("Internet Relay Network")).then_some(())
    })
    .await;
    say(&network, "JOIN #hearth").await;
    let channel = sync.accept_invite(&bot, &[control.clone(), network.clone()]).await;

    // Matrix to IRC.
    say(&channel, "hello from matrix").await;
    irc.wait("the Matrix message", |l| l.ends_with(" PRIVMSG #hearth :hello from matrix")).await;
    // IRC to Matrix: the bridge registers a puppet for the IRC user, which speaks in the room.
    irc.send("PRIVMSG #hearth :hello from irc").await;
    sync.wait_body(&channel, "hello from irc", puppet).await;
    let speaker = sync
        .timeline
        .iter()
        .find(|(r, e)| *r == channel && e["content"]["body"] == "hello from irc")
        .map(|(_, e)| e["sender"].as_str().unwrap().to_owned())
        .unwrap();
    assert!(speaker.contains("ircfriend"), "the puppet is the IRC user's: {speaker}");
    let whoami = owner.anonymous().get(&format!("/profile/{}", enc(&speaker))).await;
    assert_eq!(whoami.status, 200, "the puppet is a registered user: {}", whoami.text);

    // The bridge goes down; messages are sent meanwhile and Hearth restarts.
    open.store(false, Ordering::SeqCst);
    drop(bridge);
    irc.wait("the bridge leaving IRC", |l| l.starts_with(":owner!") && l.contains(" QUIT")).await;
    let during = ["while down 1", "while down 2", "while down 3"];
    for t in during {
        say(&channel, t).await;
    }
    let TestServer { running, dir: server_dir, .. } = server;
    running.stop().await;
    let mut c = test_config(server_dir.path());
    config(&mut c, hearth_port, &registration);
    let running = hearth::server::start(c).await.expect("hearth restarts");
    say(&channel, "after the restart").await;

    // The bridge comes back, reconnects to IRC and rejoins the channel; then Hearth may reach it again.
    bridge = heisenbridge(d, &registration, bridge_port, &owner_id, &hearth_url, 2);
    let quits = irc.lines().iter().filter(|l| l.starts_with(":owner!") && l.contains(" QUIT")).count();
    assert!(quits >= 1, "the bridge's QUIT was seen above");
    // heisenbridge 1.15.4 now and then stalls in its own start-up reconnect: its log ends at "Init done with 1
    // networks connecting" and no IRC connection is ever made (seen twice in about 25 runs, more often under CPU
    // load; the cause inside the bridge is not known). A second start is a second outage from Hearth's point of view,
    // so the test then starts the bridge once more rather than fail on the bridge's bug; what Hearth owes (every
    // event once, in order) is checked below either way. On a second stall the logs of every start (at debug level)
    // say where each stood.
    let mut deadline = tokio::time::Instant::now() + WAIT / 2;
    let mut restarted = false;
    loop {
        let joins = irc.lines().iter().filter(|l| l.starts_with(":owner!") && l.contains(" JOIN ")).count();
        if joins >= 2 {
            break;
        }
        if tokio::time::Instant::now() >= deadline && !restarted {
            eprintln!("the bridge stalled reconnecting to IRC; starting it once more\n{}", bridge.log());
            drop(bridge);
            bridge = heisenbridge(d, &registration, bridge_port, &owner_id, &hearth_url, 3);
            restarted = true;
            deadline = tokio::time::Instant::now() + WAIT * 2;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge did not come back on #hearth\n--- IRC\n{}\n--- bridge logs, every start\n{}",
            irc.lines().join("\n"),
            (1..=3)
                .map(|n| format!(
                    "-- start {n}\n{}",
                    std::fs::read_to_string(d.join(format!("heisenbridge-{n}.log"))).unwrap_or_default()
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    open.store(true, Ordering::SeqCst);
    irc.wait("the last message", |l| l.ends_with(" PRIVMSG #hearth :after the restart")).await;
    irc.send("PRIVMSG #hearth :back from irc").await;
    sync.wait_body(&channel, "back from irc", puppet).await;

    // Everything once and in order, both ways.
    let mut expected = vec!["hello from matrix"];
    expected.extend(during);
    expected.push("after the restart");
    let said: Vec<String> = irc.said("#hearth").into_iter().filter(|t| !t.contains("from irc")).collect();
    assert_eq!(said, expected, "Matrix messages on IRC (bridge log: {})", bridge.log());
    let from_irc = sync.bodies(&channel, puppet);
    assert_eq!(from_irc, ["hello from irc", "back from irc"], "IRC messages in the Matrix room");
    assert!(
        !sync.bodies(&channel, |s| s == bot).iter().any(|b| b.to_lowercase().contains("not connected")),
        "the bridge never had to drop a message"
    );
    drop(bridge);
    running.stop().await;
}
