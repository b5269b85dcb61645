//! BPF_PROG_TEST_RUN checks shared by the test-run files: run a program on one packet and
//! expect exactly one count where it belongs.

use overlay_agent::datapath::Datapath;
use overlay_common::counters::Counter;

/// The test-run side of a loaded [`Datapath`].
pub trait TestRun {
    /// Verdict and output of `program` on `packet`.
    fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>);
    /// Packets counted under `(network, counter)`.
    fn stat(&self, network: u32, counter: Counter) -> u64;
    /// Sum of every counter: to show a packet left no other trace.
    fn total_packets(&self) -> u64;
    /// Every counter, for failure messages.
    fn all_counters(&self) -> String;
    /// Runs `program` on `packet` and expects `verdict`, one count under `(network, counter)`
    /// and `also` counts elsewhere (none, or an XDP program's `xdp_dropped`).
    #[allow(clippy::too_many_arguments, reason = "a check's whole expectation")]
    fn expect_counted_once(
        &self,
        what: &str,
        program: &str,
        packet: &[u8],
        verdict: u32,
        network: u32,
        counter: Counter,
        also: u64,
    ) {
        let before = self.stat(network, counter);
        let total_before = self.total_packets();
        let (got, _) = self.run(program, packet);
        assert_eq!(
            got,
            verdict,
            "{what} ({program}): verdict; counters {}",
            self.all_counters()
        );
        assert_eq!(
            self.stat(network, counter),
            before + 1,
            "{what} ({program}): {} of network {network} not counted once; counters {}",
            counter.name(),
            self.all_counters()
        );
        assert_eq!(
            self.total_packets(),
            total_before + 1 + also,
            "{what} ({program}): counted more than once: {}",
            self.all_counters()
        );
    }
}

impl TestRun for Datapath {
    fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        self.test_run(program, packet).unwrap()
    }

    fn stat(&self, network: u32, counter: Counter) -> u64 {
        self.maps().stat(network, counter).unwrap()
    }

    fn total_packets(&self) -> u64 {
        self.maps().stats().unwrap().iter().map(|r| r.packets).sum()
    }

    fn all_counters(&self) -> String {
        format!("{:?}", self.maps().stats().unwrap())
    }
}
