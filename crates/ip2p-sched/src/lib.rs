//! ip2p-sched
