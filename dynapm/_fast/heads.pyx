# Header names and response heads, handled on raw bytes.
#
# httptools (llhttp in strict mode) has already validated every head passed
# here: lines end in CRLF, header names are tokens followed by ':', there is
# no obs-fold. So a plain scan for ':' and CR is enough, and a response head
# is rewritten with one copy instead of a Python object per header.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcpy


cdef inline bint same(const char *text, const char *lower,
                      Py_ssize_t length) noexcept nogil:
    # ASCII case-insensitive comparison with a lowercase literal.
    cdef Py_ssize_t i
    cdef char c
    for i in range(length):
        c = text[i]
        if 65 <= c <= 90:
            c = c + 32
        if c != lower[i]:
            return False
    return True


cdef int header_kind(const char *name, Py_ssize_t length) noexcept nogil:
    if length > 6 and same(name, b"proxy-", 6):
        return HEADER_PROXY
    if length == 2:
        if same(name, b"te", 2):
            return HEADER_TE
    elif length == 4:
        if same(name, b"host", 4):
            return HEADER_HOST
    elif length == 7:
        if same(name, b"upgrade", 7):
            return HEADER_UPGRADE
        if same(name, b"trailer", 7):
            return HEADER_TRAILER
    elif length == 10:
        if same(name, b"connection", 10):
            return HEADER_CONNECTION
        if same(name, b"keep-alive", 10):
            return HEADER_KEEP_ALIVE
    elif length == 14:
        if same(name, b"content-length", 14):
            return HEADER_CONTENT_LENGTH
    elif length == 15:
        if same(name, b"x-forwarded-for", 15):
            return HEADER_X_FORWARDED_FOR
    elif length == 16:
        if same(name, b"x-forwarded-host", 16):
            return HEADER_X_FORWARDED_HOST
    elif length == 17:
        if same(name, b"transfer-encoding", 17):
            return HEADER_TRANSFER_ENCODING
        if same(name, b"x-forwarded-proto", 17):
            return HEADER_X_FORWARDED_PROTO
    return HEADER_OTHER


cdef inline bint is_space(char c) noexcept nogil:
    return c == 32 or c == 9


cdef bint connection_names_others(bytes value) except -1:
    return names_others(PyBytes_AS_STRING(value), len(value))


cdef bint names_others(const char *p, Py_ssize_t n) noexcept nogil:
    # True when a Connection value lists a token other than close,
    # keep-alive or upgrade: those tokens name headers to drop.
    cdef Py_ssize_t i = 0, start, end
    while i < n:
        while i < n and (is_space(p[i]) or p[i] == 44):
            i += 1
        start = i
        while i < n and p[i] != 44:
            i += 1
        end = i
        while end > start and is_space(p[end - 1]):
            end -= 1
        if end == start:
            continue
        if end - start == 5 and same(p + start, b"close", 5):
            continue
        if end - start == 10 and same(p + start, b"keep-alive", 10):
            continue
        if end - start == 7 and same(p + start, b"upgrade", 7):
            continue
        return True
    return False


cdef set connection_tokens(bytes value):
    return {token.strip() for token in value.lower().split(b",")}


cdef inline Py_ssize_t find(const char *p, Py_ssize_t start, Py_ssize_t end,
                            char c) noexcept nogil:
    cdef const char *hit = <const char *>memchr(p + start, c, end - start)
    if hit == NULL:
        return end
    return hit - p


cdef Py_ssize_t head_end(bytes data, Py_ssize_t start) except -1:
    # Offset just past the CRLFCRLF that ends the head beginning at start.
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = len(data), i = start
    while True:
        i = find(p, i, n, 13)
        if i + 3 >= n:
            raise ValueError("no end of head")
        if p[i + 1] == 10 and p[i + 2] == 13 and p[i + 3] == 10:
            return i + 4
        i += 1


cdef int scan_response(bytes head, ResponseInfo *info) except -1:
    cdef const char *p = PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = len(head), i, colon, eol, value
    cdef int kind
    info.has_length = False
    info.chunked = False
    info.names_others = False
    i = find(p, 0, n, 13) + 2
    # The head ends with an empty line: stop before its CRLF.
    while i < n - 2:
        eol = find(p, i, n, 13)
        colon = find(p, i, eol, 58)
        kind = header_kind(p + i, colon - i)
        if kind == HEADER_CONTENT_LENGTH:
            info.has_length = True
        elif kind == HEADER_TRANSFER_ENCODING:
            info.chunked = True
        elif kind == HEADER_CONNECTION:
            value = colon + 1
            if names_others(p + value, eol - value):
                info.names_others = True
        i = eol + 2
    return 0


cdef bytes rewrite_response(bytes head, bint keep_upgrade, bytes tail,
                            object drop):
    """The head as the client gets it: HTTP/1.1 status line, the upstream's
    header lines as they were minus hop-by-hop ones, then ``tail`` (framing
    headers and the final CRLF). ``drop``: more lowercase names to remove."""
    cdef const char *p = PyBytes_AS_STRING(head)
    cdef Py_ssize_t n = len(head), size = 0, i, colon, eol
    cdef Py_ssize_t tail_size = len(tail)
    cdef int kind
    cdef bint keep
    cdef char *out = <char *>malloc(n + tail_size + 8)
    if out == NULL:
        raise MemoryError()
    try:
        # "HTTP/1.0 200 OK" -> "HTTP/1.1 200 OK": the client talks to us.
        eol = find(p, 0, n, 13)
        memcpy(out, b"HTTP/1.1", 8)
        memcpy(out + 8, p + 8, eol + 2 - 8)
        size = eol + 2
        i = eol + 2
        while i < n - 2:
            eol = find(p, i, n, 13)
            colon = find(p, i, eol, 58)
            kind = header_kind(p + i, colon - i)
            if kind == HEADER_OTHER or kind == HEADER_CONTENT_LENGTH:
                keep = drop is None or p[i:colon].lower() not in drop
            elif kind == HEADER_CONNECTION or kind == HEADER_UPGRADE:
                keep = keep_upgrade
            else:
                keep = kind >= HEADER_HOST and (
                    drop is None or p[i:colon].lower() not in drop)
            if keep:
                memcpy(out + size, p + i, eol + 2 - i)
                size += eol + 2 - i
            i = eol + 2
        memcpy(out + size, PyBytes_AS_STRING(tail), tail_size)
        size += tail_size
        return PyBytes_FromStringAndSize(out, size)
    finally:
        free(out)
