#![no_main]

// libfuzzer-sys aborts on every panic, even one the code under test catches. Chat
// templates are rendered under catch_unwind (minijinja 2.24 can panic on hostile
// templates), so restore the default hook: a panic that escapes still fails the run.
libfuzzer_sys::fuzz_target!(
    init: {
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| sluice_fuzz::chat_template(data)
);
