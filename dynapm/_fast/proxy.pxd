# The hot path's attribute layout. Pure-Python modules (gateway, lifecycle,
# admin) reach these objects through their public attributes; nothing else
# cimports them yet.

from dynapm._fast.heads cimport Framing, RequestHead

cdef class ServiceState:
    cdef public str name
    cdef public bint online
    # Open exchanges: in-flight requests, streaming responses, tunnels.
    cdef public long active
    # CLOCK_MONOTONIC seconds of the last request arrival or exchange end.
    cdef public double last_activity
    cdef public double last_request
    cdef public object lifecycle
    cdef public long generation
    cdef public list pools
    # Plain counters read by the metrics collector at scrape time.
    cdef public unsigned long long requests
    cdef public unsigned long long responses_1xx
    cdef public unsigned long long responses_2xx
    cdef public unsigned long long responses_3xx
    cdef public unsigned long long responses_4xx
    cdef public unsigned long long responses_5xx
    cdef public unsigned long long upstream_errors
    cdef public unsigned long long bytes_in
    cdef public unsigned long long bytes_out

    cdef void count_status(self, int status) noexcept


cdef class Pool:
    cdef public str host
    cdef public int port
    cdef list idle

    cdef Upstream take(self)
    cdef void put(self, Upstream upstream)
    cdef void discard(self, Upstream upstream)


cdef class Route:
    cdef public ServiceState service
    cdef public Pool pool
    cdef public bytes host_header
    cdef public bint preserve_host


cdef class Settings:
    cdef public object loop
    cdef public dict hosts
    cdef public set connections
    cdef public long long max_body
    cdef public long max_header
    cdef public double header_timeout
    cdef public double keepalive_timeout
    cdef public double upstream_timeout
    cdef public bint access_log
    cdef public bint draining


cdef class Exchange:
    cdef Route route
    cdef bytes method
    cdef bytes target
    cdef bytes head
    cdef bint is_head
    cdef bint http10
    cdef bint keep_alive
    cdef bint chunked
    cdef bint upgrade
    cdef bint idempotent
    cdef bint complete
    cdef bint head_sent
    cdef bint body_sent
    cdef bint sent_all
    cdef bint counted
    cdef list pending
    cdef Py_ssize_t pending_size
    cdef list retained
    cdef list early
    cdef Py_ssize_t early_size
    cdef Py_ssize_t retained_size
    cdef long long body_size
    cdef int error_status
    cdef str error_detail
    cdef int status
    cdef int tries
    cdef bint recovered
    cdef long generation
    cdef double started
    cdef double sent_at
    cdef Upstream upstream


cdef class Downstream:
    cdef Settings settings
    cdef Route fixed_route
    cdef object transport
    cdef object write
    cdef object parser
    cdef bytes peer
    cdef bint in_head
    cdef double head_started
    cdef double idle_since
    cdef bytes forwarded_line
    cdef Py_ssize_t head_size
    # The request head being parsed.
    cdef bytes target
    cdef list parts
    cdef bytes host
    cdef int hosts
    cdef bytes te
    cdef long long length
    # Body bytes still to come of a request read by simple_request: while
    # not 0 they are counted in data_received, httptools sees none of them.
    cdef long long body_left
    cdef bytes connection
    cdef bytes upgrade
    cdef list forwarded_for
    cdef bytes last_host
    cdef bytes data
    cdef bytes line_data
    cdef bint at_boundary
    cdef Route last_route
    cdef object get_method
    cdef object get_http_version
    cdef object should_keep_alive
    cdef Exchange parsing
    cdef Exchange current
    cdef Exchange upgrade_ex
    cdef Exchange last_ex
    cdef Py_ssize_t head_bytes
    # The head being parsed began in the current feed to httptools.
    cdef bint head_began
    cdef list queue
    cdef int paused
    cdef bint write_paused
    cdef bint raw
    cdef bint tunnel
    cdef bint broken
    cdef bint closing
    cdef bint closed
    cdef bint client_eof
    cdef double linger_until

    cdef int _finish_head(self, bint simple) except -1
    cdef int _message_begin(self) except -1
    cdef int _header(self, bytes name, bytes value) except -1
    cdef int _message_complete(self) except -1
    cdef int _simple_request(self, bytes data, Py_ssize_t start,
                             Py_ssize_t end, RequestHead *head) except -1
    cdef Py_ssize_t _counted_body(self, bytes data, Py_ssize_t start) except -1
    cdef int _body(self, bytes body) except -1
    cdef int _new_parser(self) except -1
    cdef bint _read_request_line(self, Exchange ex) except -1
    cdef int _next(self) except -1
    cdef int _after_feed(self) except -1
    cdef int _parse_failed(self, str detail) except -1
    cdef int _begin(self, Exchange ex) except -1
    cdef int _dispatch(self, Exchange ex, bint fresh) except -1
    cdef int _attach(self, Exchange ex, Upstream upstream) except -1
    cdef int _flush(self, Exchange ex) except -1
    cdef int _pause(self, int reason) except -1
    cdef int _resume(self, int reason) except -1
    cdef int _release(self, Exchange ex) except -1
    cdef int _exchange_done(self, Exchange ex, bint close) except -1
    cdef int _respond_error(self, Exchange ex, int status, str detail,
                            bint close) except -1
    cdef int _upstream_failed(self, Exchange ex, int status,
                              str detail) except -1
    cdef int _close_gracefully(self) except -1
    cdef int _fatal(self, int status, str detail) except -1
    cpdef check_timeouts(self, double now)


cdef class Upstream:
    cdef Pool pool
    cdef object transport
    cdef object write
    cdef object parser
    cdef Downstream downstream
    cdef Exchange ex
    cdef list out
    cdef bytes buf
    cdef bytes carry
    cdef Py_ssize_t scan
    cdef long long remaining
    cdef bint in_head
    cdef bint interim
    cdef bint got_bytes
    cdef bint head_forwarded
    cdef bint rechunk
    cdef bint close_delimited
    cdef bint close_client
    cdef bint keep_alive
    cdef bint finished
    cdef bint new_parser
    cdef bint broken
    cdef bint tunnel
    cdef bint closed
    cdef bint eof
    cdef bint reading_paused
    cdef long uses
    cdef double last_activity
    cdef object get_status_code
    cdef object should_keep_alive

    cdef int _begin(self, Downstream downstream, Exchange ex) except -1
    cdef int _new_parser(self) except -1
    cdef int _detach(self) except -1
    cdef int _response_head(self, bytes head, int status,
                            Framing *framing) except -1
    cdef int _stray(self) except -1
    cdef bint _simple_head(self, bytes data, Py_ssize_t end,
                           Framing *framing) except -1
    cdef int _complete(self) except -1
    cdef int _pause_reading(self) except -1
    cdef int _resume_reading(self) except -1
