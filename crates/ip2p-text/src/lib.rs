//! ip2p-text
