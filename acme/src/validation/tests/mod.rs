//! Tests of challenge validation against real servers on loopback
//! addresses (127.0.0.1, 127.0.0.2, 127.0.0.3 and ::1).

mod dns01;
mod http01;
mod pool;
mod support;
mod tls_alpn01;
