//! What Postern tells its operator about itself besides its log: the access log (one
//! line per session) and the Prometheus metrics.

pub mod access_log;
pub mod metrics;
