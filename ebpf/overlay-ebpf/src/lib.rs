//! The eBPF programs live in the `overlay` binary target (`src/main.rs`), built for
//! `bpfel-unknown-none` by the agent's build script. This empty library only exists so that the
//! agent can name this crate as a build dependency, which makes cargo rebuild the embedded object
//! when anything here changes.
#![no_std]
