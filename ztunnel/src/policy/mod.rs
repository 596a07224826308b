//! Authorization after authentication: who may call which workload on which
//! port. `model` is the configuration (Istio's L4 AuthorizationPolicy
//! shape), `eval` the decision, `validate` the checks at load, `explain`
//! the decision in the workload's modes and the matrix of who may call what.

pub mod eval;
pub mod explain;
pub mod model;
pub mod validate;

pub use self::{
    eval::{Decision, Modes, PolicySet, Verdict},
    explain::decide,
};
