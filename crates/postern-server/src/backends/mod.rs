//! The backends: connecting and logging in (`backend`), their health (`health` runs
//! the checks and keeps the states; `service_health` is the sans-IO model that tells
//! slow from dead), admission control (`admission` decides, `admit` queues), and blame
//! (`blame`: whose fault a failure is).

pub mod admission;
pub mod admit;
pub mod backend;
pub mod blame;
pub mod health;
pub mod service_health;
