//! Allocations per request through the stack, and whether memory grows with the number of
//! requests: a counting global allocator around the system one, the stack over in-process mock
//! backends (no sockets, so the figures are the stack's and the mock's alone), against the same
//! mock called bare.
//!
//! Run: `cargo bench --bench memory` (`-- --requests N` to change the count; default 1 000 000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use tower::{ServiceBuilder, ServiceExt};
use tower_llm_lb::Backend;
use tower_llm_lb::balance::Balance;
use tower_llm_lb::body::ReplayBody;
use tower_llm_lb::circuit_breaker::{BreakerGroup, Policy};
use tower_llm_lb::endpoint::EndpointLayer;
use tower_llm_lb::retry::RetryAfter429Layer;
use tower_llm_lb_mock::{InProcess, MockServer};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        LIVE.fetch_add(layout.size() as i64, Relaxed);
        // SAFETY: forwarding to the system allocator with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn request() -> http::Request<ReplayBody> {
    http::Request::post("/v1/chat/completions")
        .body(ReplayBody::new(bytes::Bytes::from_static(
            br#"{"messages":[]}"#,
        )))
        .expect("valid request")
}

fn mock(name: &str) -> InProcess {
    MockServer::builder()
        .name(name)
        .record_requests(false)
        .in_process()
}

fn main() {
    let n: u64 = std::env::args()
        .skip_while(|a| a != "--requests")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bare = mock("bare");
        let mocks = [mock("b0"), mock("b1"), mock("b2")];
        let backends: Vec<Backend> = (0..3)
            .map(|i| {
                Backend::openai(format!("b{i}"), format!("http://b{i}.sim/v1"))
                    .build()
                    .expect("backend")
            })
            .collect();
        let breakers = BreakerGroup::try_new(Policy::default()).expect("policy");
        let balance = Balance::from_backends(backends.iter().cloned(), |b| {
            let i = backends
                .iter()
                .position(|x| x.name() == b.name())
                .unwrap_or(0);
            ServiceBuilder::new()
                .layer(breakers.layer_for(b))
                .layer(EndpointLayer::new(b.clone()))
                .service(mocks[i].clone())
        })
        .build()
        .expect("group");
        let stack = ServiceBuilder::new()
            .layer(RetryAfter429Layer::default())
            .service(balance);

        let measure = |label: &'static str, allocs: u64, n: u64| {
            println!(
                "{label:<28} {:>8.1} allocations per request",
                allocs as f64 / n as f64
            );
        };
        // Warm up both paths (pools, maps), then count.
        for _ in 0..1000 {
            let _ = bare.clone().oneshot(request()).await;
            let _ = stack.clone().oneshot(request()).await;
        }
        let sample = 10_000;
        let a0 = ALLOCS.load(Relaxed);
        for _ in 0..sample {
            let _ = bare.clone().oneshot(request()).await;
        }
        let bare_allocs = ALLOCS.load(Relaxed) - a0;
        let a0 = ALLOCS.load(Relaxed);
        for _ in 0..sample {
            let _ = stack.clone().oneshot(request()).await;
        }
        let stack_allocs = ALLOCS.load(Relaxed) - a0;
        measure("mock alone", bare_allocs, sample);
        measure("stack + mock", stack_allocs, sample);
        measure(
            "the stack's own",
            stack_allocs.saturating_sub(bare_allocs),
            sample,
        );

        // Growth: live heap after every tenth of the run.
        println!("\nlive heap while sending {n} requests through the stack:");
        let step = n / 10;
        for i in 1..=10 {
            for _ in 0..step {
                let _ = stack.clone().oneshot(request()).await;
            }
            println!(
                "  after {:>8} requests: {:>8.1} KiB live",
                i * step,
                LIVE.load(Relaxed) as f64 / 1024.0
            );
        }
    });
}
