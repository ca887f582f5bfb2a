//! Tests against MQTT brokers: mosquitto as shipped in `config/mosquitto/`
//! (skipped with a SKIPPED line when it is not installed, a failure when
//! `BMSGW_REQUIRE_MOSQUITTO` is set) and the embedded rumqttd over TCP.
//! Not run under emulation (the cross lane).
//!
//! Run one file's tests with its module path as the filter, for example
//! `cargo test --test broker mqtt_acl::`.
#![cfg(feature = "sim")]

#[path = "../fault_support/mod.rs"]
mod fault_support;
#[path = "../link_support/mod.rs"]
mod link_support;
#[path = "../support/mod.rs"]
mod support;

mod bench_cloud;
mod cloud_e2e;
mod demo;
mod fault_broker;
mod link_mosquitto;
mod link_rumqttd;
mod link_wake;
mod mosquitto_example;
mod mqtt_acl;
