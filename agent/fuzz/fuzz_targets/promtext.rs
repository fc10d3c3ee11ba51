//! The Prometheus text parser on arbitrary pages. What parses must survive the writer: the
//! re-exported text parses again to the same number of samples.
#![no_main]

use inferwatch::{
    collect::scrape::parse::{self, Family},
    export::reexport::write_sources,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut families) = parse::parse(text) else { return };
    parse::add_current_names(&mut families);
    let mut out = String::new();
    write_sources(&mut out, &[(&families, &[("vllm_instance", "fuzz")])]);
    let again = parse::parse(&out).unwrap_or_else(|e| panic!("our own output does not parse: {e}\n{out}"));
    let samples = |fs: &[Family]| fs.iter().map(|f| f.samples.len()).sum::<usize>();
    assert!(samples(&again) <= samples(&families), "the writer invented samples:\n{out}");
});
