//! Helpers shared by the integration tests.

/// A component that lifts one core function `() -> ()` under each of `names`: a plugin's shape
/// without its types, for the checks made when a plugin loads.
pub fn component_exporting(names: &[&str]) -> Vec<u8> {
    let exports: String = names
        .iter()
        .map(|name| format!(r#"(func (export "{name}") (canon lift (core func $i "f")))"#))
        .collect();
    let text = format!(
        r#"(component
            (core module $m (func (export "f")))
            (core instance $i (instantiate $m))
            {exports})"#
    );
    wat::parse_str(text).expect("a valid component")
}
