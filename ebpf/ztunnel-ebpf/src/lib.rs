#![no_std]
// A library target lets ztunnel list this crate as a build-dependency, so cargo
// rebuilds the embedded object when the programs change; they live in main.rs.
