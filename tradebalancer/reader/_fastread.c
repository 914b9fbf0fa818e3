/*
 * tradebalancer.reader._fastread: the worker side's per-message loop in C, for framing.py.
 *
 * parse(data, begin, messages, limit) -> (end, bad): from the boundary data[begin], appends to
 * the list messages each complete message's body (the bytes after its 4-byte little-endian
 * length) while the headers are sound: length below limit (format.LIMIT, passed in so that
 * the rule has one home) and body starting with '{'. Stops at
 * the first message that is not complete, or at a bad header, and returns its offset and
 * whether it was bad. MessageParser keeps everything else (partial headers, the resync rule,
 * the error it records), so this changes speed, never results: tests/test_framing.py and
 * tests/test_reader.py run with it and without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define OPEN_BRACE '{'

static PyObject *parse(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4 || !PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "parse(data, begin, messages: list, limit)");
        return NULL;
    }
    Py_ssize_t position = PyLong_AsSsize_t(args[1]);
    if (position == -1 && PyErr_Occurred())
        return NULL;
    const unsigned long limit = PyLong_AsUnsignedLong(args[3]);
    if (limit == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *data = view.buf;
    const Py_ssize_t size = view.len;
    if (position < 0 || position > size) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "begin is outside data");
        return NULL;
    }
    PyObject *messages = args[2];
    int bad = 0;
    while (size - position >= 5) {
        const unsigned char *header = data + position;
        unsigned long length = (unsigned long)header[0] | (unsigned long)header[1] << 8 |
                               (unsigned long)header[2] << 16 | (unsigned long)header[3] << 24;
        if (length >= limit || header[4] != OPEN_BRACE) {
            bad = 1;
            break;
        }
        if ((Py_ssize_t)length > size - position - 4)
            break; /* not complete yet */
        PyObject *body = PyBytes_FromStringAndSize((const char *)header + 4, (Py_ssize_t)length);
        if (body == NULL || PyList_Append(messages, body) < 0) {
            Py_XDECREF(body);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(body);
        position += 4 + (Py_ssize_t)length;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(nO)", position, bad ? Py_True : Py_False);
}

static PyMethodDef fastread_methods[] = {
    {"parse", (PyCFunction)(void (*)(void))parse, METH_FASTCALL,
     "parse(data, begin, messages, limit) -> (end, bad): append the complete messages from "
     "the boundary begin; end is where parsing stopped, bad whether a header there is unsound."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastread_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tradebalancer.reader._fastread",
    .m_doc = "The worker side's per-message loop in C: see framing.py.",
    .m_size = -1,
    .m_methods = fastread_methods,
};

PyMODINIT_FUNC PyInit__fastread(void)
{
    return PyModule_Create(&fastread_module);
}
