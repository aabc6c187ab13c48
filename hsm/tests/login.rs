//! Login failures on a real SoftHSM2 token.

mod common;

use sigil_hsm::{Hsm, HsmError, HsmMetrics, Pin};

#[test]
fn wrong_pin_fails_without_pin_in_message() {
    let label = common::new_token("wrong-pin");
    let wrong_pin = "wrong-pin-93571";

    let error = Hsm::open(&common::config(&label, 1), Pin::new(wrong_pin.to_owned()), HsmMetrics::unregistered())
        .expect_err("wrong PIN must fail");

    assert!(
        matches!(&error, HsmError::Login { code, .. } if code == "CKR_PIN_INCORRECT"),
        "unexpected error {error:?}"
    );
    let display = error.to_string();
    let debug = format!("{error:?}");
    assert!(display.contains(&label), "message {display:?} does not name the token");
    assert!(display.contains("CKR_PIN_INCORRECT"), "{display}");
    assert!(!display.contains(wrong_pin), "Display shows the PIN");
    assert!(!debug.contains(wrong_pin), "Debug shows the PIN");
    assert!(!display.contains(common::USER_PIN), "Display shows the user PIN");
    assert!(!debug.contains(common::USER_PIN), "Debug shows the user PIN");
}

#[test]
fn correct_pin_after_wrong_pin() {
    let label = common::new_token("retry-pin");
    Hsm::open(&common::config(&label, 1), Pin::new("not-the-pin".to_owned()), HsmMetrics::unregistered())
        .expect_err("wrong PIN must fail");

    let hsm = common::open(&label, 1);
    assert_eq!(hsm.token_info().label, label);
}
