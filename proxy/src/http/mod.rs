//! The HTTP connection manager: serves one downstream connection with hyper (HTTP/1.1 and
//! HTTP/2), applies limits and header sanitation, runs the HTTP filters and the router.
