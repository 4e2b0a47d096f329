//! [`RedisServer`]: a real `redis-server` on a loopback port, for tests of replicas sharing
//! state (`tower_llm_lb::shared::RedisStore`). Never a fake of Redis: the binary must be installed
//! (Debian's `redis-server`).

use std::io;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` process on a loopback port, stopped when dropped.
///
/// ```no_run
/// # fn main() -> std::io::Result<()> {
/// let redis = tower_llm_lb_mock::RedisServer::start(Some("pw"))?;
/// assert!(redis.url().starts_with("redis://:pw@127.0.0.1:"));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    /// Extra arguments (cluster mode).
    args: Vec<String>,
    /// Serving TLS only (`--tls-port`), with these certificate and key files.
    tls: Option<(String, String)>,
}

/// A loopback port free a moment ago.
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl RedisServer {
    /// Starts a server on a free port, with a password if given, and waits until it takes
    /// connections. Fails, saying how to install it, when `redis-server` is not installed.
    pub fn start(password: Option<&str>) -> io::Result<RedisServer> {
        RedisServer::launched(password, Vec::new(), None)
    }

    /// Starts a server that speaks TLS only (`rediss://`), with a password if given, its
    /// certificate and key (PEM) written to `dir`: a `redis-server` built with TLS (Debian's
    /// is). Clients need not present a certificate.
    pub fn start_tls(
        password: Option<&str>,
        dir: &Path,
        cert_pem: &str,
        key_pem: &str,
    ) -> io::Result<RedisServer> {
        let (cert, key) = (dir.join("redis-cert.pem"), dir.join("redis-key.pem"));
        std::fs::write(&cert, cert_pem)?;
        std::fs::write(&key, key_pem)?;
        let tls = (cert.display().to_string(), key.display().to_string());
        RedisServer::launched(password, Vec::new(), Some(tls))
    }

    /// Starts a node of a Redis Cluster (cluster mode, its state file in `dir`), not yet joined
    /// to others (`redis-cli --cluster create` does that).
    pub fn cluster_node(dir: &Path) -> io::Result<RedisServer> {
        let args = vec![
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-config-file".into(),
            // The port is not known yet: a name of the node's own.
            format!("nodes-{}.conf", free_port()?),
            "--dir".into(),
            dir.display().to_string(),
        ];
        RedisServer::launched(None, args, None)
    }

    fn launched(
        password: Option<&str>,
        args: Vec<String>,
        tls: Option<(String, String)>,
    ) -> io::Result<RedisServer> {
        let mut r = RedisServer {
            child: None,
            port: free_port()?,
            password: password.map(str::to_string),
            args,
            tls,
        };
        // A server that could not bind its port (a parallel test took it) has exited by the
        // time it would listen: it is started on another port.
        for _ in 0..5 {
            if r.spawn()? {
                return Ok(r);
            }
            r.port = free_port()?;
        }
        Err(io::Error::other(match r.tls {
            None => "redis-server did not start",
            Some(_) => "redis-server did not start with TLS (built without it?)",
        }))
    }

    /// Stops the server (its clients see it go away); [`RedisServer::restart`] brings it back.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (its clients know that one), with no data.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        for _ in 0..20 {
            if self.spawn()? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::other(format!(
            "redis-server did not start again on {}",
            self.port
        )))
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL, with the password when it has one (`redis://:pw@127.0.0.1:PORT`;
    /// `rediss://` when it speaks TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// One start on the current port: false if the server exited (its port was taken).
    fn spawn(&mut self) -> io::Result<bool> {
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some((cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &port])
                .args(["--tls-cert-file", cert, "--tls-key-file", key])
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        cmd.args(&self.args);
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "redis-server could not be started ({e}): install it (`apt-get install redis-server`)"
                ),
            )
        })?;
        for _ in 0..500 {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(false);
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // Listening: and ours, if it is still running a moment later.
                std::thread::sleep(Duration::from_millis(50));
                if let Ok(Some(_)) = child.try_wait() {
                    return Ok(false);
                }
                self.child = Some(child);
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(false)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
