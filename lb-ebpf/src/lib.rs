// The datapath is the `lb` binary (src/main.rs). This empty library only exists so that `lb-agent` can
// name this crate as a build dependency, which makes cargo rebuild the agent when the datapath changes.
#![no_std]
