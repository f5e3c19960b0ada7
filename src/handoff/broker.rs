//! (being written)
pub struct Broker;
pub struct Namespace;
pub struct Policy;
