/* router._speedups: C versions of hot-path byte work, equal in behaviour to their Python originals.

   Each function here has a reference implementation in Python (named in its docstring) that
   defines what it does; the tests run both on the same inputs and require identical results.
   The compiled build uses these where present; the interpreted router never does. They exist
   because per-line work in Python (a slice, a lower(), a comparison per header line) costs far
   more than the same scan over a byte buffer in C, and a response head is scanned per request;
   and because b"".join acquires and releases a buffer per piece, while a request head is
   joined from a dozen pieces per request. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define TE_NONE 0
#define TE_CHUNKED 1
#define TE_OTHER 2

static inline unsigned char
ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* s[0:n] equals the lower-case literal `lit` once ASCII-lowered (bytes.lower() semantics). */
static int
lower_equals(const char *s, Py_ssize_t n, const char *lit)
{
    Py_ssize_t len = (Py_ssize_t)strlen(lit);
    if (n != len) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ascii_lower((unsigned char)s[i]) != (unsigned char)lit[i]) {
            return 0;
        }
    }
    return 1;
}

static inline int
is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* Leftmost "\r\n" in s[from:n], or -1. */
static Py_ssize_t
find_crlf(const char *s, Py_ssize_t from, Py_ssize_t n)
{
    while (from < n - 1) {
        const char *cr = memchr(s + from, '\r', (size_t)(n - 1 - from));
        if (cr == NULL) {
            return -1;
        }
        Py_ssize_t at = cr - s;
        if (s[at + 1] == '\n') {
            return at;
        }
        from = at + 1;
    }
    return -1;
}

/* Offset of the leftmost "\r\n\r\n" in s[0:n], or -1 (memmem's general search costs more
   than this on heads a few hundred bytes long). */
static Py_ssize_t
find_blank_line(const char *s, Py_ssize_t n)
{
    Py_ssize_t from = 0;
    while (from <= n - 4) {
        const char *cr = memchr(s + from, '\r', (size_t)(n - 3 - from));
        if (cr == NULL) {
            return -1;
        }
        Py_ssize_t at = cr - s;
        if (s[at + 1] == '\n' && s[at + 2] == '\r' && s[at + 3] == '\n') {
            return at;
        }
        from = at + 1;
    }
    return -1;
}

/* The (end, content_length, coding, passthrough) tuple; steals `passthrough`, borrows
   `content_length` (NULL: -1). */
static PyObject *
head_result(Py_ssize_t end, PyObject *content_length, int coding, PyObject *passthrough)
{
    PyObject *result = PyTuple_New(4);
    PyObject *end_obj = PyLong_FromSsize_t(end);
    PyObject *length_obj = content_length != NULL ? Py_NewRef(content_length) : PyLong_FromLong(-1);
    PyObject *coding_obj = PyLong_FromLong(coding);
    if (result == NULL || end_obj == NULL || length_obj == NULL || coding_obj == NULL) {
        Py_XDECREF(result);
        Py_XDECREF(end_obj);
        Py_XDECREF(length_obj);
        Py_XDECREF(coding_obj);
        Py_DECREF(passthrough);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, end_obj);
    PyTuple_SET_ITEM(result, 1, length_obj);
    PyTuple_SET_ITEM(result, 2, coding_obj);
    PyTuple_SET_ITEM(result, 3, passthrough);
    return result;
}

/* int(value) for a Content-Length value: plain OWS-digits-OWS here, anything else (signs,
   underscores, other whitespace, huge numbers, junk) through Python's own int() so that the
   result, or the ValueError, is exactly the reference's. */
static PyObject *
parse_length(const char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0, end = n;
    while (i < end && is_ows(s[i])) {
        i++;
    }
    while (end > i && is_ows(s[end - 1])) {
        end--;
    }
    if (end > i && end - i <= 18) {
        long long value = 0;
        Py_ssize_t j = i;
        for (; j < end; j++) {
            if (s[j] < '0' || s[j] > '9') {
                break;
            }
            value = value * 10 + (s[j] - '0');
        }
        if (j == end) {
            return PyLong_FromLongLong(value);
        }
    }
    PyObject *raw = PyBytes_FromStringAndSize(s, n);
    if (raw == NULL) {
        return NULL;
    }
    PyObject *result = PyNumber_Long(raw);
    Py_DECREF(raw);
    return result;
}

/* Spans (start, stop) of lines dropped from the passthrough head: a few fit on the stack, a
   head with more grows a heap copy. */
typedef struct {
    Py_ssize_t small[16];
    Py_ssize_t *spans;
    int count;
    int capacity;
} Cuts;

static int
cuts_add(Cuts *cuts, Py_ssize_t start, Py_ssize_t stop)
{
    if (cuts->count + 2 > cuts->capacity) {
        int capacity = cuts->capacity * 2;
        Py_ssize_t *grown = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(grown, cuts->spans, sizeof(Py_ssize_t) * (size_t)cuts->count);
        if (cuts->spans != cuts->small) {
            PyMem_Free(cuts->spans);
        }
        cuts->spans = grown;
        cuts->capacity = capacity;
    }
    cuts->spans[cuts->count++] = start;
    cuts->spans[cuts->count++] = stop;
    return 0;
}

static void
cuts_free(Cuts *cuts)
{
    if (cuts->spans != cuts->small) {
        PyMem_Free(cuts->spans);
    }
}

PyDoc_STRVAR(scan_response_head_doc,
"scan_response_head(buf, /)\n--\n\n"
"C version of router.http.scan_response_head (see there); same results for every input.");

static PyObject *
scan_response_head(PyObject *module, PyObject *arg)
{
    if (!PyBytes_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan_response_head() needs bytes");
        return NULL;
    }
    const char *buf = PyBytes_AS_STRING(arg);
    Py_ssize_t size = PyBytes_GET_SIZE(arg);

    /* The head ends at the first blank line; none yet means nothing is looked at. */
    Py_ssize_t blank = find_blank_line(buf, size);
    if (blank < 0) {
        return head_result(-1, NULL, TE_NONE, Py_NewRef(Py_None));
    }
    Py_ssize_t end = blank + 4;
    Py_ssize_t line_end = find_crlf(buf, 0, size);
    int passthrough_ok = size >= 9 && memcmp(buf, "HTTP/1.1 ", 9) == 0;
    PyObject *content_length = NULL; /* NULL: none seen (-1) */
    int coding = TE_NONE;
    Cuts cuts;
    cuts.spans = cuts.small;
    cuts.count = 0;
    cuts.capacity = 16;
    PyObject *result = NULL;
    Py_ssize_t pos = line_end + 2;

    for (;;) {
        if (pos >= end - 2) {
            break; /* at the blank line */
        }
        Py_ssize_t next = find_crlf(buf, pos, size);
        const char *line = buf + pos;
        Py_ssize_t len = next - pos;
        unsigned char first = (unsigned char)(line[0] | 0x20);
        if (first == 'c' || first == 'k' || first == 'p' || first == 't' || first == 'u') {
            const char *colon_at = memchr(line, ':', (size_t)len);
            /* Like line.find(b":") == -1 in the reference: name = line[:-1], value = whole line. */
            Py_ssize_t colon = colon_at ? colon_at - line : -1;
            Py_ssize_t name_len = colon >= 0 ? colon : len - 1;
            const char *value = line + colon + 1;
            Py_ssize_t value_len = len - (colon + 1);
            if (lower_equals(line, name_len, "content-length")) {
                PyObject *parsed = parse_length(value, value_len);
                if (parsed == NULL) {
                    goto fail;
                }
                Py_XSETREF(content_length, parsed);
            }
            else if (lower_equals(line, name_len, "connection")) {
                Py_ssize_t a = 0, b = value_len;
                while (a < b && is_ows(value[a])) {
                    a++;
                }
                while (b > a && is_ows(value[b - 1])) {
                    b--;
                }
                if (b == a || lower_equals(value + a, b - a, "close")) {
                    if (cuts_add(&cuts, pos - 2, pos + len) < 0) {
                        goto fail;
                    }
                }
                else if (!lower_equals(value + a, b - a, "keep-alive")) {
                    passthrough_ok = 0;
                }
            }
            else if (lower_equals(line, name_len, "keep-alive")) {
                if (cuts_add(&cuts, pos - 2, pos + len) < 0) {
                    goto fail;
                }
            }
            else if (lower_equals(line, name_len, "transfer-encoding")) {
                Py_ssize_t b = value_len;
                while (b > 0 && is_ows(value[b - 1])) {
                    b--;
                }
                coding = (b >= 7 && lower_equals(value + b - 7, 7, "chunked")) ? TE_CHUNKED : TE_OTHER;
                passthrough_ok = 0;
            }
            else if (lower_equals(line, name_len, "proxy-connection")
                     || lower_equals(line, name_len, "proxy-authenticate")
                     || lower_equals(line, name_len, "proxy-authorization")
                     || lower_equals(line, name_len, "te")
                     || lower_equals(line, name_len, "trailer")
                     || lower_equals(line, name_len, "upgrade")) {
                passthrough_ok = 0;
            }
        }
        pos = next + 2;
    }

    PyObject *passthrough;
    if (!passthrough_ok) {
        passthrough = Py_NewRef(Py_None);
    }
    else if (cuts.count == 0) {
        passthrough = end < size ? PyBytes_FromStringAndSize(buf, end) : Py_NewRef(arg);
    }
    else {
        Py_ssize_t *c = cuts.spans;
        int n = cuts.count;
        Py_ssize_t total = c[0] + (end - c[n - 1]);
        for (int i = 1; i < n - 1; i += 2) {
            total += c[i + 1] - c[i];
        }
        passthrough = PyBytes_FromStringAndSize(NULL, total);
        if (passthrough != NULL) {
            char *out = PyBytes_AS_STRING(passthrough);
            memcpy(out, buf, (size_t)c[0]);
            out += c[0];
            for (int i = 1; i < n - 1; i += 2) {
                memcpy(out, buf + c[i], (size_t)(c[i + 1] - c[i]));
                out += c[i + 1] - c[i];
            }
            memcpy(out, buf + c[n - 1], (size_t)(end - c[n - 1]));
        }
    }
    if (passthrough == NULL) {
        goto fail;
    }
    result = head_result(end, content_length, coding, passthrough);
    goto done;
fail:
    result = NULL;
done:
    Py_XDECREF(content_length);
    cuts_free(&cuts);
    return result;
}

PyDoc_STRVAR(join_bytes_doc,
"join_bytes(pieces, /)\n--\n\n"
"b\"\".join(pieces), the same result for every input; a list of exact bytes objects is joined\n"
"without the buffer-protocol acquire and release per piece.");

static PyObject *
join_bytes(PyObject *module, PyObject *pieces)
{
    if (PyList_CheckExact(pieces)) {
        Py_ssize_t count = PyList_GET_SIZE(pieces);
        Py_ssize_t total = 0;
        Py_ssize_t i = 0;
        for (; i < count; i++) {
            PyObject *piece = PyList_GET_ITEM(pieces, i);
            if (!PyBytes_CheckExact(piece) || PyBytes_GET_SIZE(piece) > PY_SSIZE_T_MAX - total) {
                break;
            }
            total += PyBytes_GET_SIZE(piece);
        }
        if (i == count) {
            if (count == 1) {
                return Py_NewRef(PyList_GET_ITEM(pieces, 0));
            }
            PyObject *joined = PyBytes_FromStringAndSize(NULL, total);
            if (joined == NULL) {
                return NULL;
            }
            char *out = PyBytes_AS_STRING(joined);
            for (i = 0; i < count; i++) {
                PyObject *piece = PyList_GET_ITEM(pieces, i);
                memcpy(out, PyBytes_AS_STRING(piece), (size_t)PyBytes_GET_SIZE(piece));
                out += PyBytes_GET_SIZE(piece);
            }
            return joined;
        }
    }
    /* Anything else (another sequence, bytearray or memoryview pieces, wrong types) takes
       bytes.join itself, with its own results and errors. */
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL) {
        return NULL;
    }
    PyObject *joined = PyObject_CallMethod(empty, "join", "(O)", pieces);
    Py_DECREF(empty);
    return joined;
}

PyDoc_STRVAR(head_fields_h2_doc,
"head_fields_h2(head, skip, /)\n--\n\n"
"router.h2upstream.head_fields_h2 in C: (request target, [(lower-cased name, value without\n"
"surrounding spaces and tabs)]) of an HTTP/1.1 request head, fields named in skip left out.");

static PyObject *
head_fields_h2(PyObject *module, PyObject *args)
{
    PyObject *head_obj, *skip;
    if (!PyArg_ParseTuple(args, "SO!:head_fields_h2", &head_obj, &PyFrozenSet_Type, &skip)) {
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(head_obj);
    Py_ssize_t n = PyBytes_GET_SIZE(head_obj);
    Py_ssize_t line_end = find_crlf(s, 0, n);
    if (line_end < 0) {
        line_end = n;
    }
    /* The request line's second space-separated piece (bytes.split(b" ", 2)[1]), or b"". */
    PyObject *target = NULL;
    const char *sp1 = memchr(s, ' ', (size_t)line_end);
    if (sp1 == NULL) {
        target = PyBytes_FromStringAndSize(NULL, 0);
    } else {
        const char *from = sp1 + 1;
        const char *sp2 = memchr(from, ' ', (size_t)(s + line_end - from));
        target = PyBytes_FromStringAndSize(from, (sp2 != NULL ? sp2 : s + line_end) - from);
    }
    PyObject *fields = PyList_New(0);
    if (target == NULL || fields == NULL) {
        goto fail;
    }
    Py_ssize_t at = line_end + 2;
    while (at < n) {
        Py_ssize_t end = find_crlf(s, at, n);
        if (end < 0) {
            end = n;
        }
        if (end > at) {
            const char *line = s + at;
            Py_ssize_t size = end - at;
            const char *colon = memchr(line, ':', (size_t)size);
            Py_ssize_t name_size = colon != NULL ? colon - line : size;
            PyObject *name = PyBytes_FromStringAndSize(NULL, name_size);
            if (name == NULL) {
                goto fail;
            }
            char *lowered = PyBytes_AS_STRING(name);
            for (Py_ssize_t i = 0; i < name_size; i++) {
                lowered[i] = (char)ascii_lower((unsigned char)line[i]);
            }
            int skipped = PySet_Contains(skip, name);
            if (skipped < 0) {
                Py_DECREF(name);
                goto fail;
            }
            if (skipped) {
                Py_DECREF(name);
            } else {
                const char *v = colon != NULL ? colon + 1 : line + size;
                const char *v_end = line + size;
                while (v < v_end && (*v == ' ' || *v == '\t')) {
                    v++;
                }
                while (v_end > v && (v_end[-1] == ' ' || v_end[-1] == '\t')) {
                    v_end--;
                }
                PyObject *value = PyBytes_FromStringAndSize(v, v_end - v);
                PyObject *pair = value != NULL ? PyTuple_Pack(2, name, value) : NULL;
                Py_DECREF(name);
                Py_XDECREF(value);
                if (pair == NULL) {
                    goto fail;
                }
                int appended = PyList_Append(fields, pair);
                Py_DECREF(pair);
                if (appended < 0) {
                    goto fail;
                }
            }
        }
        at = end + 2;
    }
    PyObject *result = PyTuple_Pack(2, target, fields);
    Py_DECREF(target);
    Py_DECREF(fields);
    return result;
fail:
    Py_XDECREF(target);
    Py_XDECREF(fields);
    return NULL;
}

static PyMethodDef speedups_methods[] = {
    {"scan_response_head", scan_response_head, METH_O, scan_response_head_doc},
    {"join_bytes", join_bytes, METH_O, join_bytes_doc},
    {"head_fields_h2", head_fields_h2, METH_VARARGS, head_fields_h2_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "router._speedups",
    .m_doc = "C versions of hot-path byte work; each function names its Python original.",
    .m_size = 0,
    .m_methods = speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
