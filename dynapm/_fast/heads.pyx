# Request and response heads, handled on raw bytes.
#
# Two kinds of head pass through here. Heads httptools (llhttp in strict
# mode) has already validated: their lines end in CRLF, header names are
# tokens followed by ':', there is no obs-fold, so a plain scan for ':' and
# CR is enough and a response head is rewritten with one copy instead of a
# Python object per header. And the common simple heads that arrive whole in
# one read, which simple_request and simple_response check byte by byte
# against a strict subset of what llhttp accepts, so the hot path can skip
# httptools and its Python callbacks for them.

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy


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


cdef bytes join_bytes(list parts):
    """b"".join(parts) for a list of bytes, without the buffer protocol
    round trip per item that bytes.join makes."""
    cdef Py_ssize_t total = 0, i, size
    cdef bytes out
    cdef char *dst
    for i in range(len(parts)):
        total += PyBytes_GET_SIZE(<bytes?>parts[i])
    out = PyBytes_FromStringAndSize(NULL, total)
    dst = PyBytes_AS_STRING(out)
    for i in range(len(parts)):
        size = PyBytes_GET_SIZE(<bytes>parts[i])
        memcpy(dst, PyBytes_AS_STRING(<bytes>parts[i]), size)
        dst += size
    return out


cdef inline bint is_space(char c) noexcept nogil:
    return c == 32 or c == 9


cdef bint connection_names_others(bytes value) except -1:
    return names_others(PyBytes_AS_STRING(value), len(value))


cdef bint names_others(const char *p, Py_ssize_t n) noexcept nogil:
    # True when a Connection value lists a token other than close,
    # keep-alive or upgrade: those tokens name headers to drop.
    cdef bint close = False, keep = False, upgrade = False
    return connection_flags(p, n, &close, &keep, &upgrade)


FRAMING_NAMES = frozenset([b"content-length", b"transfer-encoding", b"host"])


cdef set connection_tokens(bytes value):
    # The header names a Connection value lists, lowercased. Names that
    # frame or route the message are never removed because Connection lists
    # them: dropping Content-Length while forwarding the body would let the
    # body pass for another request (request smuggling).
    cdef set names = {token.strip() for token in value.lower().split(b",")}
    return names.difference(FRAMING_NAMES)


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


# Byte classes for simple_request and simple_response, one lookup per byte.
cdef enum:
    TCHAR = 1  # RFC 9110 token character
    TEXT = 2   # field value or reason phrase: HTAB, SP, VCHAR

cdef unsigned char CLASS[256]


cdef void fill_classes() noexcept:
    cdef int c
    for c in range(256):
        CLASS[c] = 0
        if c == 9 or 32 <= c <= 126:
            CLASS[c] |= TEXT
        if (48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122 or
                c in b"!#$%&'*+-.^_`|~"):
            CLASS[c] |= TCHAR


fill_classes()


cdef inline Py_ssize_t field_line(const unsigned char *p, Py_ssize_t i,
                                  Py_ssize_t n,
                                  Py_ssize_t *colon) noexcept nogil:
    # The line at i of a head being checked. A well-formed field line (a
    # token, ':', a printable value, CRLF): the offset of its CR, and its
    # colon's offset in colon. The empty line ending the head: minus the
    # offset just past it. 0 if the line is malformed or not complete in n.
    cdef Py_ssize_t start = i
    if i + 1 >= n:
        return 0
    if p[i] == 13:
        return -(i + 2) if p[i + 1] == 10 else 0
    while i < n and CLASS[p[i]] & TCHAR:
        i += 1
    if i == start or i >= n or p[i] != 58:
        return 0
    colon[0] = i
    i += 1
    while i < n and CLASS[p[i]] & TEXT:
        i += 1
    if i + 1 >= n or p[i] != 13 or p[i + 1] != 10:
        return 0
    return i


cdef inline long long plain_length(const unsigned char *p, Py_ssize_t j,
                                   Py_ssize_t eol) noexcept nogil:
    # The Content-Length value between j and eol when it is plain: one run
    # of at most 18 digits, with optional blanks around it. -1 otherwise.
    cdef Py_ssize_t start
    cdef long long length = 0
    while j < eol and is_space(p[j]):
        j += 1
    start = j
    while j < eol and 48 <= p[j] <= 57 and j - start < 18:
        length = length * 10 + p[j] - 48
        j += 1
    if j == start:
        return -1
    while j < eol and is_space(p[j]):
        j += 1
    return length if j == eol else -1


cdef Py_ssize_t simple_response(bytes data, Framing *framing) except -1:
    """The length of the response head at the start of ``data`` when httptools
    is not needed to frame the response: the whole head is there, strictly
    well formed (HTTP/1.0 or 1.1, token names, CRLF line ends, only HTAB and
    printable ASCII in values), with exactly one plain Content-Length and
    no Transfer-Encoding. 0 otherwise: the caller then lets httptools parse it.

    Everything accepted here is accepted by llhttp in strict mode with the
    same meaning, so the two paths cannot frame one response differently."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = len(data), i, colon = 0, eol, end
    cdef bint http11, close = False, keep = False, upgrade = False
    cdef int lengths = 0, kind
    cdef long long length = 0
    if n < 16 or memcmp(p, b"HTTP/1.", 7) != 0 or p[8] != 32:
        return 0
    if p[7] == 49:
        http11 = True
    elif p[7] == 48:
        http11 = False
    else:
        return 0
    for i in range(9, 12):
        if not 48 <= p[i] <= 57:
            return 0
    framing.status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + p[11] - 48
    framing.names_others = False
    i = 12
    if p[i] == 32:
        i += 1
        while i < n and CLASS[p[i]] & TEXT:
            i += 1
    if i + 1 >= n or p[i] != 13 or p[i + 1] != 10:
        return 0
    i += 2
    framing.line_end = i
    framing.runs = 0
    while True:
        eol = field_line(p, i, n, &colon)
        if eol <= 0:
            break
        kind = header_kind(<const char *>p + i, colon - i)
        if kind == HEADER_TRANSFER_ENCODING:
            return 0
        if kind_kept(kind, False) and framing.runs >= 0:
            if framing.runs and framing.run_end[framing.runs - 1] == i:
                framing.run_end[framing.runs - 1] = eol + 2
            elif framing.runs == MAX_RUNS:
                framing.runs = -1
            else:
                framing.run_start[framing.runs] = i
                framing.run_end[framing.runs] = eol + 2
                framing.runs += 1
        if kind == HEADER_CONTENT_LENGTH:
            lengths += 1
            length = plain_length(p, colon + 1, eol)
            if length < 0:
                return 0
        elif kind == HEADER_CONNECTION:
            if connection_flags(<const char *>p + colon + 1, eol - colon - 1,
                                &close, &keep, &upgrade):
                framing.names_others = True
        i = eol + 2
    if eol == 0 or lengths != 1:
        return 0
    end = -eol
    framing.length = length
    framing.keep_alive = persists(http11, close, keep)
    return end


cdef bint connection_flags(const char *p, Py_ssize_t n, bint *close,
                           bint *keep, bint *upgrade) noexcept nogil:
    # Sets close / keep / upgrade when the Connection value lists those
    # tokens (case-insensitive, anywhere in the list); returns whether it
    # lists any other token.
    cdef Py_ssize_t i = 0, start, end
    cdef bint others = False
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
            close[0] = True
        elif end - start == 10 and same(p + start, b"keep-alive", 10):
            keep[0] = True
        elif end - start == 7 and same(p + start, b"upgrade", 7):
            upgrade[0] = True
        else:
            others = True
    return others


cdef inline bint persists(bint http11, bint close, bint keep) noexcept nogil:
    # RFC 9112 section 9.3: HTTP/1.1 persists unless "close" is listed,
    # HTTP/1.0 only with "keep-alive" (and "close" always wins).
    return not close if http11 else keep and not close


cdef bint keep_alive_of(bint http10, bytes connection) except -1:
    """Whether a request's connection persists, from its version and its
    Connection header values (joined with commas, or None)."""
    cdef bint close = False, keep = False, upgrade = False
    if connection is not None:
        connection_flags(PyBytes_AS_STRING(connection), len(connection),
                         &close, &keep, &upgrade)
    return persists(not http10, close, keep)


cdef Py_ssize_t simple_request(bytes data, Py_ssize_t start,
                               RequestHead *head) except -1:
    """Where the request head starting at offset ``start`` of ``data`` ends
    (past its CRLF CRLF; offsets in head are into data too) when httptools
    is not needed for it: the whole head is there and is strictly well
    formed (a common method, an origin-form target of printable ASCII,
    HTTP/1.0 or 1.1, token names, values of HTAB and printable ASCII, CRLF
    line ends), with at most one plain Content-Length (head.length, 0
    without one), no Transfer-Encoding and no upgrade. 0 otherwise: the
    caller then feeds the bytes to httptools. Bytes after the head are its
    body or the next request; they are not looked at.

    Everything accepted here is accepted by llhttp in strict mode and read
    the same way, so a request cannot mean one thing on one path and
    another on the other."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = len(data), i, colon = 0, eol, end
    cdef bint close = False, keep = False, upgrade = False
    cdef int lengths = 0, kind
    cdef const unsigned char *q = p + start
    head.length = 0
    if n - start < 18:
        return 0
    if memcmp(q, b"GET ", 4) == 0:
        i = 4
    elif memcmp(q, b"HEAD ", 5) == 0 or memcmp(q, b"POST ", 5) == 0:
        i = 5
    elif memcmp(q, b"PUT ", 4) == 0:
        i = 4
    elif memcmp(q, b"PATCH ", 6) == 0:
        i = 6
    elif memcmp(q, b"DELETE ", 7) == 0:
        i = 7
    elif memcmp(q, b"OPTIONS ", 8) == 0:
        i = 8
    else:
        return 0
    head.method_end = start + i - 1
    i += start
    if p[i] != 47:
        # Not origin-form ("/..."): absolute-form and "*" take the
        # general path.
        return 0
    head.target_start = i
    while i < n and 33 <= p[i] <= 126:
        i += 1
    head.target_end = i
    if i + 10 > n or memcmp(p + i, b" HTTP/1.", 8) != 0:
        return 0
    if p[i + 8] != 49 and p[i + 8] != 48:
        return 0
    head.http10 = p[i + 8] == 48
    if p[i + 9] != 13 or i + 10 >= n or p[i + 10] != 10:
        return 0
    i += 11
    while True:
        eol = field_line(p, i, n, &colon)
        if eol <= 0:
            break
        kind = header_kind(<const char *>p + i, colon - i)
        if kind == HEADER_TRANSFER_ENCODING or kind == HEADER_UPGRADE:
            return 0
        if kind == HEADER_CONTENT_LENGTH:
            lengths += 1
            head.length = plain_length(p, colon + 1, eol)
            if head.length < 0:
                return 0
        elif kind == HEADER_CONNECTION:
            connection_flags(<const char *>p + colon + 1, eol - colon - 1,
                             &close, &keep, &upgrade)
        i = eol + 2
    if eol == 0 or lengths > 1 or upgrade:
        return 0
    end = -eol
    head.headers = head.target_end + 11
    return end


cdef enum:
    MAX_RUNS = 16


cdef inline bint kind_kept(int kind, bint keep_upgrade) noexcept nogil:
    # Whether a response header of this kind reaches the client (before
    # the names a Connection header lists are taken into account).
    if kind == HEADER_OTHER or kind == HEADER_CONTENT_LENGTH:
        return True
    if kind == HEADER_CONNECTION or kind == HEADER_UPGRADE:
        return keep_upgrade
    return kind >= HEADER_HOST


cdef bytes emit_response(bytes head, Framing *framing, bytes tail):
    """rewrite_response for a head simple_response has read (no drop list,
    runs recorded): the status line as HTTP/1.1, the runs, ``tail``, copied
    straight into the new bytes object."""
    cdef const char *p = PyBytes_AS_STRING(head)
    cdef Py_ssize_t size = framing.line_end + len(tail), length
    cdef int r
    cdef bytes out
    cdef char *dst
    for r in range(framing.runs):
        size += framing.run_end[r] - framing.run_start[r]
    out = PyBytes_FromStringAndSize(NULL, size)
    dst = PyBytes_AS_STRING(out)
    memcpy(dst, b"HTTP/1.1", 8)
    memcpy(dst + 8, p + 8, framing.line_end - 8)
    dst += framing.line_end
    for r in range(framing.runs):
        length = framing.run_end[r] - framing.run_start[r]
        memcpy(dst, p + framing.run_start[r], length)
        dst += length
    memcpy(dst, PyBytes_AS_STRING(tail), len(tail))
    return out


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
            keep = kind_kept(kind, keep_upgrade)
            if keep and drop is not None and kind != HEADER_CONNECTION and \
                    kind != HEADER_UPGRADE:
                keep = p[i:colon].lower() not in drop
            if keep:
                memcpy(out + size, p + i, eol + 2 - i)
                size += eol + 2 - i
            i = eol + 2
        memcpy(out + size, PyBytes_AS_STRING(tail), tail_size)
        size += tail_size
        return PyBytes_FromStringAndSize(out, size)
    finally:
        free(out)
