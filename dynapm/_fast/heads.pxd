# Header classification and response head rewriting in C, for proxy.pyx.

cdef enum:
    HEADER_OTHER = 0
    HEADER_CONNECTION = 1
    HEADER_KEEP_ALIVE = 2
    HEADER_TE = 3
    HEADER_TRAILER = 4
    HEADER_UPGRADE = 5
    HEADER_TRANSFER_ENCODING = 6
    HEADER_PROXY = 7
    HEADER_CONTENT_LENGTH = 8
    HEADER_HOST = 9
    HEADER_X_FORWARDED_FOR = 10
    HEADER_X_FORWARDED_HOST = 11
    HEADER_X_FORWARDED_PROTO = 12


cdef struct ResponseInfo:
    bint has_length
    bint chunked
    # The Connection header names headers beyond close/keep-alive/upgrade,
    # which must be dropped as well (RFC 9110 section 7.6.1).
    bint names_others


cdef struct Framing:
    # A response head simple_response could frame on its own.
    int status
    long long length
    bint keep_alive
    # See ResponseInfo.names_others.
    bint names_others
    # Where the status line ends (past its CRLF), and the runs of header
    # lines a client gets as they are (hop-by-hop lines fall between runs);
    # runs is -1 when there were more than MAX_RUNS.
    Py_ssize_t line_end
    int runs
    Py_ssize_t run_start[16]
    Py_ssize_t run_end[16]


cdef struct RequestHead:
    # A request head simple_request could read on its own; offsets are into
    # the bytes it was read from.
    Py_ssize_t method_end
    bint http10
    Py_ssize_t target_start
    Py_ssize_t target_end
    # Offset of the first header line.
    Py_ssize_t headers
    # The body's Content-Length, 0 without one.
    long long length


cdef int header_kind(const char *name, Py_ssize_t length) noexcept nogil
cdef bint connection_names_others(bytes value) except -1
cdef Py_ssize_t head_end(bytes data, Py_ssize_t start) except -1
cdef int scan_response(bytes head, ResponseInfo *info) except -1
cdef Py_ssize_t simple_response(bytes data, Framing *framing) except -1
cdef Py_ssize_t simple_request(bytes data, Py_ssize_t start,
                               RequestHead *head) except -1
cdef bint keep_alive_of(bint http10, bytes connection) except -1
cdef bytes rewrite_response(bytes head, bint keep_upgrade, bytes tail,
                            object drop)
cdef bytes emit_response(bytes head, Framing *framing, bytes tail)
cdef set connection_tokens(bytes value)
cdef bytes join_bytes(list parts)
