/* router._ngrecord: the three nghttp2 callbacks that run for every header field and every DATA
   chunk, in C, equal in behaviour to their Python originals in router/nghttp2.py
   (_on_begin_headers, _on_header, _on_data_chunk over a _PyRecorder), and NgEngine._drain's loop.

   Through ctypes, each callback from libnghttp2 into Python costs a trampoline that converts
   every argument to an object before any work starts; a small gRPC call makes about fifteen such
   calls for its header fields alone, which measured as a third of the router's CPU per HTTP/2
   stream. These callbacks do the same work (collect a header block, bound its size, refuse a
   field with a NUL, join cookie crumbs later, collect a DATA frame's chunks) straight into a
   Recorder's lists, which router/nghttp2.py reads as it reads a _PyRecorder's; and drain runs
   the mem_send loop without a ctypes call and a copy through ctypes.string_at per frame. The
   frame and stream-close callbacks read the frame's head here and call their Python halves
   (router.nghttp2._frame_received, _stream_closed) with plain integers, skipping ctypes'
   conversions, as the data provider's read callback calls _read_data.

   libnghttp2 is not linked: router/nghttp2.py loads it with ctypes and hands this module the
   addresses of the two functions it calls (bind), and installs the callbacks by their addresses
   (callbacks). The session's user_data is the Recorder's address. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* nghttp2.h (1.52, soname 14): the head of every nghttp2_frame. */
typedef struct {
    size_t length;
    int32_t stream_id;
    uint8_t type;
    uint8_t flags;
    uint8_t reserved;
} frame_hd;

#define ERR_TEMPORAL_CALLBACK_FAILURE (-521)
#define ERR_CALLBACK_FAILURE (-902)
#define PROTOCOL_ERROR 0x1

typedef int (*submit_rst_stream_fn)(void *session, uint8_t flags, int32_t stream_id, uint32_t error_code);
typedef int (*consume_connection_fn)(void *session, size_t size);
typedef Py_ssize_t (*mem_send_fn)(void *session, const uint8_t **data);
typedef Py_ssize_t (*mem_recv_fn)(void *session, const uint8_t *data, size_t length);
typedef size_t (*queue_size_fn)(void *session);
typedef int (*consume_fn)(void *session, int32_t stream_id, size_t size);
typedef int32_t (*stream_window_fn)(void *session, int32_t stream_id);
typedef int32_t (*window_fn)(void *session);
typedef uint32_t (*remote_settings_fn)(void *session, int id);

static submit_rst_stream_fn submit_rst_stream = NULL;
static consume_connection_fn consume_connection = NULL;
static mem_send_fn mem_send = NULL;
static mem_recv_fn mem_recv = NULL;
static queue_size_fn outbound_queue_size = NULL;
static consume_fn consume = NULL;
static stream_window_fn stream_remote_window = NULL;
static window_fn remote_window = NULL;
static remote_settings_fn remote_settings = NULL;
#define SETTINGS_INITIAL_WINDOW_SIZE 0x4
/* router.nghttp2._frame_received and _stream_closed: what a frame or a stream's close means is
   decided in Python; these callbacks only call them without ctypes' per-argument conversions. */
static PyObject *frame_received = NULL;
static PyObject *stream_closed = NULL;
static PyObject *read_data = NULL;

typedef struct {
    PyObject_HEAD
    PyObject *block;        /* list of (name, value): the header block being received */
    PyObject *cookies;      /* list of crumbs, or None */
    PyObject *host;         /* bytes, or None */
    PyObject *chunks;       /* list of bytes: the DATA frame being received */
    PyObject *out;          /* list of bytes: frames serialized, not yet taken */
    PyObject *error;        /* what a callback failed with, or None */
    Py_ssize_t block_size;
    Py_ssize_t max_header_list;
    Py_ssize_t session;     /* the nghttp2_session *, 0 once deleted */
    int block_sid;
    int chunks_sid;
    int client;
    int oversized_code;     /* RST_STREAM code for a header list over max_header_list */
} Recorder;

static int
Recorder_init(Recorder *self, PyObject *args, PyObject *kwds)
{
    PyObject *block = PyList_New(0);
    PyObject *chunks = PyList_New(0);
    PyObject *out = PyList_New(0);
    if (block == NULL || chunks == NULL || out == NULL) {
        Py_XDECREF(block);
        Py_XDECREF(chunks);
        Py_XDECREF(out);
        return -1;
    }
    Py_XSETREF(self->block, block);
    Py_XSETREF(self->chunks, chunks);
    Py_XSETREF(self->out, out);
    Py_XSETREF(self->cookies, Py_NewRef(Py_None));
    Py_XSETREF(self->host, Py_NewRef(Py_None));
    Py_XSETREF(self->error, Py_NewRef(Py_None));
    self->block_size = 0;
    self->max_header_list = 0;
    self->session = 0;
    self->block_sid = 0;
    self->chunks_sid = 0;
    self->client = 0;
    self->oversized_code = PROTOCOL_ERROR;
    return 0;
}

static int
Recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->block);
    Py_VISIT(self->cookies);
    Py_VISIT(self->host);
    Py_VISIT(self->chunks);
    Py_VISIT(self->out);
    Py_VISIT(self->error);
    return 0;
}

static int
Recorder_clear(Recorder *self)
{
    Py_CLEAR(self->block);
    Py_CLEAR(self->cookies);
    Py_CLEAR(self->host);
    Py_CLEAR(self->chunks);
    Py_CLEAR(self->out);
    Py_CLEAR(self->error);
    return 0;
}

static void
Recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Recorder_members[] = {
    {"block", T_OBJECT, offsetof(Recorder, block), 0, NULL},
    {"cookies", T_OBJECT, offsetof(Recorder, cookies), 0, NULL},
    {"host", T_OBJECT, offsetof(Recorder, host), 0, NULL},
    {"chunks", T_OBJECT, offsetof(Recorder, chunks), 0, NULL},
    {"out", T_OBJECT, offsetof(Recorder, out), 0, NULL},
    {"error", T_OBJECT, offsetof(Recorder, error), 0, NULL},
    {"block_size", T_PYSSIZET, offsetof(Recorder, block_size), 0, NULL},
    {"max_header_list", T_PYSSIZET, offsetof(Recorder, max_header_list), 0, NULL},
    {"session", T_PYSSIZET, offsetof(Recorder, session), 0, NULL},
    {"block_sid", T_INT, offsetof(Recorder, block_sid), 0, NULL},
    {"chunks_sid", T_INT, offsetof(Recorder, chunks_sid), 0, NULL},
    {"client", T_INT, offsetof(Recorder, client), 0, NULL},
    {"oversized_code", T_INT, offsetof(Recorder, oversized_code), 0, NULL},
    {NULL},
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "router._ngrecord.Recorder",
    .tp_doc = "One nghttp2 session's header block and DATA chunks being received (see _PyRecorder).",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Recorder_init,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_members = Recorder_members,
};

/* A callback could not do its work (out of memory): the exception is kept for the engine to
   report, and nghttp2 fails the call (the connection breaks, as with a Python callback). */
static int
failed(Recorder *rec)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (rec->error == Py_None && value != NULL) {
        Py_XSETREF(rec->error, Py_NewRef(value));
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return ERR_CALLBACK_FAILURE;
}

/* _PyRecorder's begin_headers: a new block for the frame's stream. */
static int
on_begin_headers(void *session, const frame_hd *frame, void *user_data)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    Recorder *rec = (Recorder *)user_data;
    int result = 0;
    PyObject *block = PyList_New(0);
    if (block == NULL) {
        result = failed(rec);
    } else {
        Py_XSETREF(rec->block, block);
        rec->block_sid = frame->stream_id;
        rec->block_size = 0;
        Py_XSETREF(rec->cookies, Py_NewRef(Py_None));
        Py_XSETREF(rec->host, Py_NewRef(Py_None));
    }
    PyGILState_Release(gil);
    return result;
}

/* _PyRecorder.reset_block: refuse the block being received. */
static int
reset_block(Recorder *rec, uint32_t code)
{
    if (rec->session && submit_rst_stream != NULL) {
        submit_rst_stream((void *)rec->session, 0, rec->block_sid, code);
    }
    PyObject *block = PyList_New(0);
    if (block == NULL) {
        return failed(rec);
    }
    Py_XSETREF(rec->block, block);
    Py_XSETREF(rec->cookies, Py_NewRef(Py_None));
    return ERR_TEMPORAL_CALLBACK_FAILURE;
}

static int
append_new(PyObject *list, PyObject *item)
{
    if (item == NULL) {
        return -1;
    }
    int result = PyList_Append(list, item);
    Py_DECREF(item);
    return result;
}

/* _on_header: one field of the block, bounded, cookies apart (server side), host remembered. */
static int
on_header(void *session, const frame_hd *frame, const uint8_t *name, size_t namelen, const uint8_t *value,
          size_t valuelen, uint8_t flags, void *user_data)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    Recorder *rec = (Recorder *)user_data;
    int result = 0;
    if (rec->block == NULL || !PyList_CheckExact(rec->block)
        || (rec->cookies != Py_None && (rec->cookies == NULL || !PyList_CheckExact(rec->cookies)))) {
        PyErr_SetString(PyExc_TypeError, "Recorder.block and .cookies must be lists (cookies: or None)");
        result = failed(rec);
        goto done;
    }
    if (memchr(name, 0, namelen) != NULL || memchr(value, 0, valuelen) != NULL) {
        result = reset_block(rec, PROTOCOL_ERROR);
        goto done;
    }
    Py_ssize_t size = rec->block_size + (Py_ssize_t)namelen + (Py_ssize_t)valuelen + 32;
    if (size > rec->max_header_list) {
        result = reset_block(rec, (uint32_t)rec->oversized_code);
        goto done;
    }
    rec->block_size = size;
    PyObject *value_obj = PyBytes_FromStringAndSize((const char *)value, (Py_ssize_t)valuelen);
    if (value_obj == NULL) {
        result = failed(rec);
        goto done;
    }
    if (!rec->client && namelen == 6 && memcmp(name, "cookie", 6) == 0) {
        if (rec->cookies == Py_None) {
            PyObject *cookies = PyList_New(1);
            if (cookies == NULL) {
                Py_DECREF(value_obj);
                result = failed(rec);
                goto done;
            }
            PyList_SET_ITEM(cookies, 0, value_obj);
            Py_XSETREF(rec->cookies, cookies);
        } else if (append_new(rec->cookies, value_obj) < 0) {
            result = failed(rec);
        }
        goto done;
    }
    PyObject *name_obj = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)namelen);
    if (name_obj == NULL) {
        Py_DECREF(value_obj);
        result = failed(rec);
        goto done;
    }
    if (namelen == 4 && memcmp(name, "host", 4) == 0) {
        Py_XSETREF(rec->host, Py_NewRef(value_obj));
    }
    PyObject *field = PyTuple_New(2);
    if (field == NULL) {
        Py_DECREF(name_obj);
        Py_DECREF(value_obj);
        result = failed(rec);
        goto done;
    }
    PyTuple_SET_ITEM(field, 0, name_obj);
    PyTuple_SET_ITEM(field, 1, value_obj);
    if (append_new(rec->block, field) < 0) {
        result = failed(rec);
    }
done:
    PyGILState_Release(gil);
    return result;
}

/* _PyRecorder.drop_chunks: a DATA frame abandoned mid-way gives its bytes back to the connection. */
static void
drop_chunks(Recorder *rec)
{
    Py_ssize_t count = PyList_GET_SIZE(rec->chunks);
    if (!count) {
        return;
    }
    size_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        total += (size_t)PyBytes_GET_SIZE(PyList_GET_ITEM(rec->chunks, i));
    }
    if (rec->session && consume_connection != NULL) {
        consume_connection((void *)rec->session, total);
    }
    PyList_SetSlice(rec->chunks, 0, count, NULL);
}

/* _on_data_chunk: a piece of the DATA frame being received. */
static int
on_data_chunk(void *session, uint8_t flags, int32_t stream_id, const uint8_t *data, size_t len, void *user_data)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    Recorder *rec = (Recorder *)user_data;
    int result = 0;
    if (rec->chunks == NULL || !PyList_CheckExact(rec->chunks)) {
        PyErr_SetString(PyExc_TypeError, "Recorder.chunks must be a list");
        result = failed(rec);
        goto done;
    }
    if (rec->chunks_sid != stream_id) {
        drop_chunks(rec);
        rec->chunks_sid = stream_id;
    }
    if (append_new(rec->chunks, PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len)) < 0) {
        result = failed(rec);
    }
done:
    PyGILState_Release(gil);
    return result;
}

/* NgEngine._drain's loop: every frame nghttp2 has queued, serialized with nghttp2_session_mem_send
   (one call a frame) and kept in rec.out. Returns 0, or mem_send's negative error. (Not
   nghttp2_session_send with a send callback: measured, it delayed responses by tens of ms.) */
static PyObject *
drain(PyObject *module, PyObject *arg)
{
    if (!PyObject_TypeCheck(arg, &RecorderType)) {
        PyErr_SetString(PyExc_TypeError, "drain: a Recorder");
        return NULL;
    }
    Recorder *rec = (Recorder *)arg;
    if (rec->out == NULL || !PyList_CheckExact(rec->out)) {
        PyErr_SetString(PyExc_TypeError, "Recorder.out must be a list");
        return NULL;
    }
    if (!rec->session || mem_send == NULL) {
        return PyLong_FromLong(0);
    }
    for (;;) {
        const uint8_t *data = NULL;
        Py_ssize_t size = mem_send((void *)rec->session, &data);
        if (size <= 0) {
            return PyLong_FromSsize_t(size);
        }
        if (append_new(rec->out, PyBytes_FromStringAndSize((const char *)data, size)) < 0) {
            return NULL;
        }
    }
}

/* Call a Python callback with integer arguments; its int result goes back to nghttp2. */
static int
call_python(Recorder *rec, PyObject *function, Py_ssize_t *values, Py_ssize_t count)
{
    PyObject *args[7];
    Py_ssize_t made = 0;
    int result = ERR_CALLBACK_FAILURE;
    for (; made < count; made++) {
        args[made] = PyLong_FromSsize_t(values[made]);
        if (args[made] == NULL) {
            break;
        }
    }
    if (made == count) {
        PyObject *returned = PyObject_Vectorcall(function, args, (size_t)count, NULL);
        if (returned != NULL) {
            long value = PyLong_AsLong(returned);
            Py_DECREF(returned);
            if (!(value == -1 && PyErr_Occurred())) {
                result = (int)value;
            }
        }
    }
    for (Py_ssize_t i = 0; i < made; i++) {
        Py_DECREF(args[i]);
    }
    if (PyErr_Occurred()) {
        result = failed(rec);
    }
    return result;
}

/* _on_frame_recv: the frame's head read here, the rest in router.nghttp2._frame_received. */
static int
on_frame_recv(void *session, const frame_hd *frame, void *user_data)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_ssize_t values[6] = {
        (Py_ssize_t)user_data, frame->type, frame->stream_id, frame->flags, (Py_ssize_t)frame->length,
        (Py_ssize_t)frame,
    };
    int result = call_python((Recorder *)user_data, frame_received, values, 6);
    PyGILState_Release(gil);
    return result;
}

/* _on_stream_close: router.nghttp2._stream_closed, called without ctypes. */
static int
on_stream_close(void *session, int32_t stream_id, uint32_t error_code, void *user_data)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_ssize_t values[3] = {(Py_ssize_t)user_data, stream_id, (Py_ssize_t)error_code};
    int result = call_python((Recorder *)user_data, stream_closed, values, 3);
    PyGILState_Release(gil);
    return result;
}

/* The data provider: router.nghttp2._read_data, called without ctypes. */
static Py_ssize_t
on_read(void *session, int32_t stream_id, uint8_t *buf, size_t length, uint32_t *data_flags, void *source,
        void *user_data)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_ssize_t values[7] = {
        (Py_ssize_t)session, stream_id, (Py_ssize_t)buf, (Py_ssize_t)length, (Py_ssize_t)data_flags,
        (Py_ssize_t)source, (Py_ssize_t)user_data,
    };
    int result = call_python((Recorder *)user_data, read_data, values, 7);
    PyGILState_Release(gil);
    return result;
}

/* NgEngine.receive's two library calls: (mem_recv's result, whether frames are queued to send). */
static PyObject *
receive(PyObject *module, PyObject *args)
{
    PyObject *rec_obj;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "O!y*:receive", &RecorderType, &rec_obj, &data)) {
        return NULL;
    }
    Recorder *rec = (Recorder *)rec_obj;
    if (!rec->session || mem_recv == NULL) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_RuntimeError, "receive: no session");
        return NULL;
    }
    Py_ssize_t result = mem_recv((void *)rec->session, (const uint8_t *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    if (PyErr_Occurred()) {
        return NULL;  /* (a callback cannot leave one; kept from crossing silently all the same) */
    }
    /* A fatal result may have deleted nothing yet: the session lives until the engine closes it. */
    size_t queued = outbound_queue_size((void *)rec->session);
    return Py_BuildValue("(nO)", result, queued ? Py_True : Py_False);
}

/* NgEngine.consume's library call. */
static PyObject *
consume_bytes(PyObject *module, PyObject *args)
{
    PyObject *rec_obj;
    int stream_id;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "O!in:consume", &RecorderType, &rec_obj, &stream_id, &length)) {
        return NULL;
    }
    Recorder *rec = (Recorder *)rec_obj;
    if (rec->session && length > 0 && consume != NULL) {
        consume((void *)rec->session, (int32_t)stream_id, (size_t)length);
    }
    Py_RETURN_NONE;
}

/* NgEngine.send_window's library calls: min(the stream's window (the peer's initial one for a
   stream not yet open) - stream_queued, the connection's - connection_queued, max_frame), >= 0. */
static PyObject *
send_window(PyObject *module, PyObject *args)
{
    PyObject *rec_obj;
    int stream_id;
    Py_ssize_t stream_queued, connection_queued, max_frame;
    if (!PyArg_ParseTuple(args, "O!innn:send_window", &RecorderType, &rec_obj, &stream_id, &stream_queued,
                          &connection_queued, &max_frame)) {
        return NULL;
    }
    Recorder *rec = (Recorder *)rec_obj;
    if (!rec->session || stream_remote_window == NULL) {
        return PyLong_FromLong(0);
    }
    void *session = (void *)rec->session;
    Py_ssize_t window = stream_remote_window(session, (int32_t)stream_id);
    if (window < 0) {
        window = (Py_ssize_t)remote_settings(session, SETTINGS_INITIAL_WINDOW_SIZE);
    }
    window -= stream_queued;
    Py_ssize_t connection = (Py_ssize_t)remote_window(session) - connection_queued;
    if (connection < window) {
        window = connection;
    }
    if (max_frame < window) {
        window = max_frame;
    }
    return PyLong_FromSsize_t(window > 0 ? window : 0);
}

/* nghttp2.h: one header field handed to a submit call, which copies it. */
typedef struct {
    uint8_t *name;
    uint8_t *value;
    size_t namelen;
    size_t valuelen;
    uint8_t flags;
} nv;

/* NgEngine._pack: fill an nghttp2_nv array with (name, value) pairs of exact bytes. */
static PyObject *
pack(PyObject *module, PyObject *args)
{
    Py_ssize_t address, capacity;
    PyObject *headers;
    if (!PyArg_ParseTuple(args, "nnO:pack", &address, &capacity, &headers)) {
        return NULL;
    }
    PyObject *fast = PySequence_Fast(headers, "pack: headers must be a sequence");
    if (fast == NULL) {
        return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    if (count > capacity) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "pack: more header fields than the array holds");
        return NULL;
    }
    nv *out = (nv *)address;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *field = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *name, *value;
        if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 2) {
            /* As the Python original unpacks it: anything else but a pair fails there. */
            PyObject *pair = PySequence_Tuple(field);
            if (pair == NULL) {
                Py_DECREF(fast);
                return NULL;
            }
            if (PyTuple_GET_SIZE(pair) != 2) {
                PyErr_Format(PyExc_ValueError, "header field %R is not a (name, value) pair", field);
                Py_DECREF(pair);
                Py_DECREF(fast);
                return NULL;
            }
            name = PyTuple_GET_ITEM(pair, 0);
            value = PyTuple_GET_ITEM(pair, 1);
            Py_DECREF(pair);  /* (the items stay alive in field) */
        } else {
            name = PyTuple_GET_ITEM(field, 0);
            value = PyTuple_GET_ITEM(field, 1);
        }
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value)) {
            PyObject *pair = PyTuple_Pack(2, name, value);
            if (pair != NULL) {
                PyErr_Format(PyExc_TypeError, "header fields must be bytes: %R", pair);
                Py_DECREF(pair);
            }
            Py_DECREF(fast);
            return NULL;
        }
        out[i].name = (uint8_t *)PyBytes_AS_STRING(name);
        out[i].value = (uint8_t *)PyBytes_AS_STRING(value);
        out[i].namelen = (size_t)PyBytes_GET_SIZE(name);
        out[i].valuelen = (size_t)PyBytes_GET_SIZE(value);
        out[i].flags = 0;
    }
    Py_DECREF(fast);
    return PyLong_FromSsize_t(count);
}

static PyObject *
bind(PyObject *module, PyObject *args)
{
    PyObject *functions, *on_frame, *on_close, *on_read_data;
    if (!PyArg_ParseTuple(args, "O!OOO:bind", &PyDict_Type, &functions, &on_frame, &on_close, &on_read_data)) {
        return NULL;
    }
    static const char *names[] = {
        "nghttp2_submit_rst_stream", "nghttp2_session_consume_connection", "nghttp2_session_mem_send",
        "nghttp2_session_mem_recv", "nghttp2_session_get_outbound_queue_size", "nghttp2_session_consume",
        "nghttp2_session_get_stream_remote_window_size", "nghttp2_session_get_remote_window_size",
        "nghttp2_session_get_remote_settings",
    };
    Py_ssize_t found[9];
    for (int i = 0; i < 9; i++) {
        PyObject *address = PyDict_GetItemString(functions, names[i]);
        found[i] = address != NULL ? PyLong_AsSsize_t(address) : 0;
        if (found[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (!found[i]) {
            PyErr_Format(PyExc_ValueError, "bind: no address for %s", names[i]);
            return NULL;
        }
    }
    if (!PyCallable_Check(on_frame) || !PyCallable_Check(on_close) || !PyCallable_Check(on_read_data)) {
        PyErr_SetString(PyExc_TypeError, "bind: the frame and close handlers must be callable");
        return NULL;
    }
    submit_rst_stream = (submit_rst_stream_fn)found[0];
    consume_connection = (consume_connection_fn)found[1];
    mem_send = (mem_send_fn)found[2];
    mem_recv = (mem_recv_fn)found[3];
    outbound_queue_size = (queue_size_fn)found[4];
    consume = (consume_fn)found[5];
    stream_remote_window = (stream_window_fn)found[6];
    remote_window = (window_fn)found[7];
    remote_settings = (remote_settings_fn)found[8];
    Py_XSETREF(frame_received, Py_NewRef(on_frame));
    Py_XSETREF(stream_closed, Py_NewRef(on_close));
    Py_XSETREF(read_data, Py_NewRef(on_read_data));
    Py_RETURN_NONE;
}

static PyObject *
callbacks(PyObject *module, PyObject *unused)
{
    return Py_BuildValue(
        "{s:n,s:n,s:n,s:n,s:n,s:n}",
        "read", (Py_ssize_t)on_read,
        "on_frame_recv", (Py_ssize_t)on_frame_recv,
        "on_stream_close", (Py_ssize_t)on_stream_close,
        "on_begin_headers", (Py_ssize_t)on_begin_headers,
        "on_header", (Py_ssize_t)on_header,
        "on_data_chunk_recv", (Py_ssize_t)on_data_chunk);
}

static PyMethodDef module_methods[] = {
    {"bind", bind, METH_VARARGS,
     "bind(functions, frame_received, stream_closed, read_data): the addresses of the libnghttp2 functions "
     "this module calls, by name, and the Python functions the frame, stream-close and read callbacks call."},
    {"receive", receive, METH_VARARGS, "receive(recorder, data): NgEngine.receive's library calls."},
    {"consume", consume_bytes, METH_VARARGS, "consume(recorder, stream_id, length): NgEngine.consume's call."},
    {"send_window", send_window, METH_VARARGS,
     "send_window(recorder, stream_id, stream_queued, connection_queued, max_frame): NgEngine.send_window's calls."},
    {"pack", pack, METH_VARARGS,
     "pack(nv_address, capacity, headers): NgEngine._pack's loop in C; the number of fields packed."},
    {"drain", drain, METH_O, "drain(recorder): NgEngine._drain's loop in C; 0 or mem_send's error."},
    {"callbacks", callbacks, METH_NOARGS,
     "The callbacks' addresses by nghttp2 setter name (nghttp2_session_callbacks_set_<name>_callback)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "router._ngrecord",
    .m_doc = "nghttp2's per-field and per-chunk callbacks in C (originals: router.nghttp2._PyRecorder).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__ngrecord(void)
{
    if (PyType_Ready(&RecorderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Recorder", (PyObject *)&RecorderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
