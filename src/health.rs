//! stub
pub async fn probe_http(_a: std::net::SocketAddr, _p: &str, _t: std::time::Duration) -> Result<(), String> { Ok(()) }
pub async fn probe_tcp(_a: std::net::SocketAddr, _t: std::time::Duration) -> Result<(), String> { Ok(()) }
