//! End-to-end tests on the real default model: tokenizer and greedy-output parity with
//! llama.cpp (fixtures in tests/fixtures), and the `sluice` binary served on a free port.

mod browser;
mod clients;
mod compat;
mod container;
mod cuda_ptx;
mod deploy_kubernetes;
mod device;
mod engine;
mod gateway;
mod loadtest;
mod local_cluster;
mod multi_model;
mod onnx;
mod openai_node;
mod openai_sdk;
mod parity;
mod prometheus;
mod redis_limits;
mod reliability;
mod responses;
mod routers;
mod sampling_api;
mod server;
mod structured;
mod support;
mod synthetic_archs;
mod tls_http2;
mod tokenizer_parity;
mod tools;
mod upstreams;
mod websocket;
