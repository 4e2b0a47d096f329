//! The real-load scenario suite: the gateway with a new user's config, over real sockets,
//! against mock backends that throttle like Azure OpenAI. Prints the table and exits non-zero
//! when a target is missed.
//!
//! ```sh
//! cargo run --release --example scenarios            # the whole suite
//! cargo run --release --example scenarios -- S1 S3   # some of them
//! ```
//!
//! S8r starts a `redis-server` on a loopback port when one is installed (`apt-get install
//! redis-server`), and is reported as not run otherwise.

use tower_llm_lb::mock::scenario::{self, Scenario, TABLE_HEADER};

#[tokio::main]
async fn main() -> Result<(), tower_llm_lb::BoxError> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(name));
    let mut missed = Vec::new();
    println!("{TABLE_HEADER}");
    for s in Scenario::suite() {
        if !wanted(s.name) {
            continue;
        }
        let report = s.run().await?;
        println!("{report}");
        missed.extend(report.missed());
    }
    if wanted("S8r") {
        // S8r needs a Redis server: one on a loopback port for the run, when installed.
        match RedisForRun::start() {
            Some(redis) => {
                let report = Scenario::s8r_replicas_shared(&redis.url()).run().await?;
                println!("{report}");
                missed.extend(report.missed());
            }
            None => println!("| S8r | not run: no `redis-server` on this machine |"),
        }
    }
    if wanted("S5") {
        let (direct, via) = scenario::overhead(4000, 16).await?;
        let ratio = via / direct;
        println!(
            "| S5 overhead | direct {direct:.0} req/s, gateway {via:.0} req/s: {ratio:.2}x | 16 in flight, 1 zero-latency backend |"
        );
        if ratio < 0.8 {
            missed.push(format!("S5: gateway {ratio:.2}x direct < 0.8"));
        }
    }
    if missed.is_empty() {
        println!("\nevery target met");
        Ok(())
    } else {
        println!("\nmissed:");
        for m in &missed {
            println!("- {m}");
        }
        std::process::exit(1);
    }
}

/// A `redis-server` on a free loopback port for the run, stopped when dropped.
struct RedisForRun {
    child: std::process::Child,
    port: u16,
}

impl RedisForRun {
    fn start() -> Option<RedisForRun> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let redis = RedisForRun { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(redis);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        None
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisForRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
