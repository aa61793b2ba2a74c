//! Prints the CustomResourceDefinitions of BatchSandbox and Pool as YAML (`deploy/crds/`).
fn main() {
    print!("{}", sandlet_controller::crd::crds_yaml());
}
