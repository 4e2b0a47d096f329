//! The gateway, as the `tower-llm-lb` binary runs it (`tower_llm_lb_gateway::cli`):
//! `cargo run --release --example gateway -- serve --mock` (or `-- serve --config gateway.json`).

fn main() -> std::process::ExitCode {
    tower_llm_lb_gateway::cli::main()
}
