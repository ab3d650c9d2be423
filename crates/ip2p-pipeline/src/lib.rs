//! ip2p-pipeline
