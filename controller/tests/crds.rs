//! The committed CRDs are what the types generate: `cargo run -p sandlet-controller --bin
//! crdgen > deploy/crds/sandbox.opensandbox.io.yaml` after changing a type.

#[test]
fn committed_crds_match_the_types() {
    let committed = include_str!("../../deploy/crds/sandbox.opensandbox.io.yaml");
    let generated = sandlet_controller::crd::crds_yaml();
    assert!(
        committed == generated,
        "deploy/crds is out of date: run `cargo run -p sandlet-controller --bin crdgen > deploy/crds/sandbox.opensandbox.io.yaml`"
    );
}
