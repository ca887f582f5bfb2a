//! The `candump -L` log parser, and everything `bmsgw decode LOG` does with
//! what it parses: passive TP reassembly, GB/T decoding, the timeline.
#![no_main]

use bmsgw::can::candump::{format_record, parse_line};
use bmsgw::gbt27930::timeline::{TimelineOptions, decode_log};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `changes_only` takes the other branch of the printer; pick it from
    // the input so both are covered.
    let options = TimelineOptions {
        changes_only: data.first().is_some_and(|b| b & 1 == 1),
    };
    let mut out = Vec::new();
    // Errors are fine (bad lines are reported in the output); panics are not.
    let _ = decode_log(data, &mut out, options);

    // Every line that parses formats to a line that parses again, and that
    // second line is a fixed point (the first may be normalised: fraction
    // digits, hex case).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let Ok(Some(record)) = parse_line(line) else {
            continue;
        };
        let formatted = format_record(&record);
        let again = match parse_line(&formatted) {
            Ok(Some(again)) => again,
            other => panic!("{line:?} parsed, but its formatting {formatted:?} gave {other:?}"),
        };
        assert_eq!(format_record(&again), formatted, "from {line:?}");
    }
});
