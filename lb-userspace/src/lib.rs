//! lb: an NLB-like layer-4 load balancer. The XDP data plane does the per-packet work; this
//! crate is the controller that configures it, and the `lb` command line.

pub mod admin;
pub mod cli;
pub mod config;
pub mod half_open;
pub mod health;
pub mod instance;
pub mod lifecycle;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod net;
pub mod next_hop;
pub mod round_robin;
pub mod run;
pub mod target;
pub mod xdp;

/// The balancer's XDP object, built by build.rs and embedded so `lb` is one self-contained file.
pub static BALANCER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-balancer"));

/// The target host's object: the IPIP decap and the reply-port translation `lb target` attaches.
pub static TARGET_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-target"));

/// Programs for labs and benchmarks (pass, reflect, generate, sink); lb never loads them. They
/// are built with the others and live here so that the tests and benchmarks find them.
pub static LAB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-lab"));
