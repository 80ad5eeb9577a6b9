/* Puts of many rows into a py-lmdb write transaction with the GIL released once.

   Why (issue #17): py-lmdb 1.x lets go of the GIL around every `mdb_cursor_put`, also
   inside `Cursor.putmulti`, and takes it back after each. While the event loop's thread
   runs Python, each take-back waits for that thread to drop the GIL (up to the switch
   interval, 5 ms): a joiner's writer thread spent ~100 ms of wall putting 8,192 rows that
   cost it ~5 ms of CPU. Here the rows' buffers are gathered with the GIL held, then every
   put runs without it, in one stretch.

   How the transaction is reached: py-lmdb exposes no `MDB_txn *`. Its `Transaction`
   object (every py-lmdb release from 1.4 to 2.3, built without memsink, which CPython 3
   builds are) is laid out as `struct py_txn` below, its `Environment` begins as
   `struct py_env`. `put_run` uses the pointer only once it has checked that the object
   is of the bound type and of that type's expected size, that it is still valid, a write
   transaction, of the environment it was given, and that LMDB itself agrees
   (`mdb_txn_env` is that environment's, `mdb_txn_id` is the id py-lmdb reports). The
   LMDB functions are py-lmdb's own (looked up in its loaded module), so the transaction
   is handled by the library instance that made it. The databases are found by name with
   `mdb_dbi_open`, which inside a transaction gives back the handle already open.

   Anything else (another py-lmdb, its cffi variant, no compiler when installing) and
   `trionode.store.gil_free` says so: the store then puts rows through py-lmdb as before. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    size_t mv_size;
    void *mv_data;
} mdb_val;  /* LMDB's MDB_val */

typedef unsigned int mdb_dbi;

enum {
    MDB_NODUPDATA = 0x20, /* putmulti's default flags (dupdata=False, overwrite=True) */
    MDB_KEYEXIST = -30799,
    TRANS_RDONLY = 2, /* py-lmdb's TransObject.flags bit of a read-only transaction */
};

struct py_head { /* py-lmdb's LmdbObject_HEAD */
    PyObject_HEAD
    void *siblings[2];
    void *children[2];
    int valid;
};

struct py_txn { /* py-lmdb's TransObject */
    struct py_head head;
    PyObject *weaklist;
    PyObject *env;
    void *txn;
    int flags;
    PyObject *db;
    int mutations;
};

struct py_env { /* the start of py-lmdb's EnvObject */
    struct py_head head;
    PyObject *weaklist;
    void *env;
};

static int (*lmdb_dbi_open)(void *, const char *, unsigned int, mdb_dbi *);
static int (*lmdb_cursor_open)(void *, mdb_dbi, void **);
static int (*lmdb_cursor_put)(void *, mdb_val *, mdb_val *, unsigned int);
static void (*lmdb_cursor_close)(void *);
static void *(*lmdb_txn_env)(void *);
static size_t (*lmdb_txn_id)(void *);
static PyTypeObject *txn_type;
static PyTypeObject *env_type;

static void *
find(void *library, const char *name)
{
    void *found = dlsym(library, name);
    if (found == NULL) {
        PyErr_Format(PyExc_OSError, "py-lmdb's module has no %s", name);
    }
    return found;
}

/* bind(path, Transaction, Environment): look up the LMDB functions in py-lmdb's
   already loaded module at `path` and remember its types. */
static PyObject *
bind(PyObject *self, PyObject *args)
{
    const char *path;
    PyObject *txn_cls, *env_cls;
    void *library;
    if (!PyArg_ParseTuple(args, "sO!O!", &path, &PyType_Type, &txn_cls, &PyType_Type, &env_cls)) {
        return NULL;
    }
    if (((PyTypeObject *)txn_cls)->tp_basicsize != (Py_ssize_t)sizeof(struct py_txn)
        || ((PyTypeObject *)env_cls)->tp_basicsize < (Py_ssize_t)sizeof(struct py_env)) {
        PyErr_SetString(PyExc_TypeError, "py-lmdb's objects are not laid out as expected");
        return NULL;
    }
    library = dlopen(path, RTLD_NOW | RTLD_NOLOAD); /* (the loaded one, never a copy) */
    if (library == NULL) {
        PyErr_Format(PyExc_OSError, "py-lmdb's module is not loaded: %s", dlerror());
        return NULL;
    }
    if (!(*(void **)&lmdb_dbi_open = find(library, "mdb_dbi_open"))
        || !(*(void **)&lmdb_cursor_open = find(library, "mdb_cursor_open"))
        || !(*(void **)&lmdb_cursor_put = find(library, "mdb_cursor_put"))
        || !(*(void **)&lmdb_cursor_close = find(library, "mdb_cursor_close"))
        || !(*(void **)&lmdb_txn_env = find(library, "mdb_txn_env"))
        || !(*(void **)&lmdb_txn_id = find(library, "mdb_txn_id"))) {
        lmdb_txn_id = NULL; /* (not bound: put_run refuses) */
        return NULL;
    }
    /* (The module stays loaded while py-lmdb is imported: the handle is not closed.) */
    Py_INCREF(txn_cls);
    Py_XSETREF(txn_type, (PyTypeObject *)txn_cls);
    Py_INCREF(env_cls);
    Py_XSETREF(env_type, (PyTypeObject *)env_cls);
    Py_RETURN_NONE;
}

/* The transaction's `MDB_txn *`, or NULL with an exception set. */
static void *
write_txn(PyObject *txn, PyObject *env)
{
    struct py_txn *t = (struct py_txn *)txn;
    PyObject *id;
    size_t expected;
    if (lmdb_txn_id == NULL || txn_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind() first");
        return NULL;
    }
    if (Py_TYPE(txn) != txn_type || Py_TYPE(env) != env_type) {
        PyErr_SetString(PyExc_TypeError, "need a py-lmdb Transaction and its Environment");
        return NULL;
    }
    if (!t->head.valid || t->txn == NULL || t->env != env || (t->flags & TRANS_RDONLY)) {
        PyErr_SetString(PyExc_ValueError, "need a live write transaction of this environment");
        return NULL;
    }
    if (lmdb_txn_env(t->txn) != ((struct py_env *)env)->env) {
        PyErr_SetString(PyExc_ValueError, "the transaction is not of this environment");
        return NULL;
    }
    id = PyObject_CallMethod(txn, "id", NULL);
    if (id == NULL) {
        return NULL;
    }
    expected = PyLong_AsSize_t(id);
    Py_DECREF(id);
    if (expected == (size_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (lmdb_txn_id(t->txn) != expected) {
        PyErr_SetString(PyExc_ValueError, "the transaction's id does not match");
        return NULL;
    }
    return t->txn;
}

/* A row's value as put: `head` (NULL: none) then `rest`. */
typedef struct {
    const char *head;
    size_t head_size;
    const char *rest;
    size_t rest_size;
} row_value;

/* The values of `values` as stored, into `out` (objects made for them appended to `keep`),
   as `_ValueRefs.pack_many` makes them (`packer` = (record_head, id_end, resolve, pack)):
   a value that starts as the last one given a head did, up to `id_end`, is that head and
   the value after `id_end`; another that starts with `record_head` (and is that long) is
   `resolve(parent)` (its bytes from after `record_head` to `id_end`) and the rest, or
   itself if that is None; any other is `pack(value)`. Without a packer, values as they
   are. Returns the size of the longest joined value, or -1 with an exception set. */
static Py_ssize_t
gather_values(PyObject *values, PyObject *packer, PyObject *keep, row_value *out)
{
    Py_ssize_t n = PyTuple_GET_SIZE(values), i, longest = 0, head_size = 0, id_end = 0;
    const char *record_head = NULL, *same = NULL, *same_head = NULL;
    Py_ssize_t record_head_size = 0, same_head_size = 0;
    PyObject *record = NULL, *resolve = NULL, *pack = NULL;
    if (packer != Py_None) {
        if (!PyArg_ParseTuple(packer, "SnOO", &record, &id_end, &resolve, &pack)) {
            return -1;
        }
        record_head = PyBytes_AS_STRING(record);
        record_head_size = PyBytes_GET_SIZE(record);
        if (id_end < record_head_size) {
            PyErr_SetString(PyExc_ValueError, "id_end is before the end of record_head");
            return -1;
        }
    }
    for (i = 0; i < n; i++) {
        PyObject *value = PyTuple_GET_ITEM(values, i), *made;
        const char *data;
        Py_ssize_t size;
        if (!PyBytes_CheckExact(value)) {
            PyErr_SetString(PyExc_TypeError, "keys and values must be bytes");
            return -1;
        }
        data = PyBytes_AS_STRING(value);
        size = PyBytes_GET_SIZE(value);
        out[i].head = NULL;
        out[i].head_size = 0;
        out[i].rest = data;
        out[i].rest_size = (size_t)size;
        if (packer == Py_None) {
            continue;
        }
        if (same != NULL && size >= id_end && memcmp(data, same, (size_t)id_end) == 0) {
            head_size = same_head_size;
            out[i].head = same_head;
        } else if (size < id_end || memcmp(data, record_head, (size_t)record_head_size) != 0) {
            made = PyObject_CallOneArg(pack, value);
            if (made == NULL || PyList_Append(keep, made) < 0) {
                Py_XDECREF(made);
                return -1;
            }
            Py_DECREF(made); /* (`keep` holds it) */
            if (!PyBytes_CheckExact(made)) {
                PyErr_SetString(PyExc_TypeError, "pack must give bytes");
                return -1;
            }
            out[i].rest = PyBytes_AS_STRING(made);
            out[i].rest_size = (size_t)PyBytes_GET_SIZE(made);
            continue;
        } else {
            PyObject *parent = PyBytes_FromStringAndSize(
                data + record_head_size, id_end - record_head_size);
            if (parent == NULL) {
                return -1;
            }
            made = PyObject_CallOneArg(resolve, parent);
            Py_DECREF(parent);
            if (made == NULL || PyList_Append(keep, made) < 0) {
                Py_XDECREF(made);
                return -1;
            }
            Py_DECREF(made);
            if (made == Py_None) {
                continue; /* (the value as it is) */
            }
            if (!PyBytes_CheckExact(made)) {
                PyErr_SetString(PyExc_TypeError, "resolve must give bytes or None");
                return -1;
            }
            same = data;
            same_head = PyBytes_AS_STRING(made);
            same_head_size = PyBytes_GET_SIZE(made);
            head_size = same_head_size;
            out[i].head = same_head;
        }
        out[i].head_size = (size_t)head_size;
        out[i].rest = data + id_end;
        out[i].rest_size = (size_t)(size - id_end);
        if (head_size + size - id_end > longest) {
            longest = head_size + size - id_end;
        }
    }
    return longest;
}

/* put_run(txn, env, db_name, prefix, keys, values, packer=None) -> (rows put, LMDB error
   code or 0): puts `prefix + keys[i]` -> `values[i]` for every i (bytes each) into the
   database named `db_name`, as `putmulti` would, stopping at the first error (then the
   transaction must be aborted, as after any failed put). With a `packer`, each value is
   put as `gather_values` makes it. */
static PyObject *
put_run(PyObject *self, PyObject *args)
{
    PyObject *txn, *env, *keys_in, *values_in, *packer = Py_None;
    PyObject *keys = NULL, *values = NULL, *keep = NULL, *result = NULL;
    const char *name;
    const char *prefix;
    Py_ssize_t prefix_size, n, i, total;
    mdb_val *rows = NULL, value;
    row_value *stored = NULL;
    char *buffer = NULL, *joined = NULL, *at;
    Py_ssize_t longest;
    void *mdb_txn, *cursor = NULL;
    mdb_dbi dbi;
    int rc = 0;
    Py_ssize_t done = 0;
    if (!PyArg_ParseTuple(
            args, "OOyy#OO|O", &txn, &env, &name, &prefix, &prefix_size, &keys_in, &values_in,
            &packer)) {
        return NULL;
    }
    if (packer != Py_None && !PyTuple_Check(packer)) {
        PyErr_SetString(PyExc_TypeError, "packer must be None or a tuple");
        return NULL;
    }
    if ((mdb_txn = write_txn(txn, env)) == NULL) {
        return NULL;
    }
    /* (Tuples of the rows hold every key and value alive, whatever becomes of the lists
       while the GIL is released; bytes do not change.) */
    if (!(keys = PySequence_Tuple(keys_in)) || !(values = PySequence_Tuple(values_in))) {
        goto end;
    }
    n = PyTuple_GET_SIZE(keys);
    if (PyTuple_GET_SIZE(values) != n) {
        PyErr_SetString(PyExc_ValueError, "need one value per key");
        goto end;
    }
    total = 0;
    for (i = 0; i < n; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) {
            PyErr_SetString(PyExc_TypeError, "keys and values must be bytes");
            goto end;
        }
        total += prefix_size + PyBytes_GET_SIZE(key);
    }
    rows = PyMem_RawMalloc(sizeof(mdb_val) * (size_t)(n ? n : 1));
    stored = PyMem_RawMalloc(sizeof(row_value) * (size_t)(n ? n : 1));
    buffer = PyMem_RawMalloc((size_t)(total ? total : 1));
    if (rows == NULL || stored == NULL || buffer == NULL || !(keep = PyList_New(0))) {
        if (!PyErr_Occurred()) {
            PyErr_NoMemory();
        }
        goto end;
    }
    if ((longest = gather_values(values, packer, keep, stored)) < 0) {
        goto end;
    }
    if (!(joined = PyMem_RawMalloc((size_t)(longest ? longest : 1)))) {
        PyErr_NoMemory();
        goto end;
    }
    at = buffer;
    for (i = 0; i < n; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        Py_ssize_t size = PyBytes_GET_SIZE(key);
        memcpy(at, prefix, (size_t)prefix_size);
        memcpy(at + prefix_size, PyBytes_AS_STRING(key), (size_t)size);
        rows[i].mv_data = at;
        rows[i].mv_size = (size_t)(prefix_size + size);
        at += prefix_size + size;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = lmdb_dbi_open(mdb_txn, name, 0, &dbi);
    if (rc == 0) {
        rc = lmdb_cursor_open(mdb_txn, dbi, &cursor);
    }
    for (i = 0; rc == 0 && i < n; i++) {
        if (stored[i].head == NULL) {
            value.mv_data = (void *)stored[i].rest;
            value.mv_size = stored[i].rest_size;
        } else { /* (put copies it: one buffer serves every row) */
            memcpy(joined, stored[i].head, stored[i].head_size);
            memcpy(joined + stored[i].head_size, stored[i].rest, stored[i].rest_size);
            value.mv_data = joined;
            value.mv_size = stored[i].head_size + stored[i].rest_size;
        }
        rc = lmdb_cursor_put(cursor, &rows[i], &value, MDB_NODUPDATA);
        if (rc == MDB_KEYEXIST) {
            rc = 0; /* (a duplicate of a sorted-duplicates database: as putmulti) */
        }
        if (rc == 0) {
            done++;
        }
    }
    if (cursor != NULL) {
        lmdb_cursor_close(cursor);
    }
    Py_END_ALLOW_THREADS
    /* (py-lmdb's cursors of this transaction re-read their position after a change.) */
    ((struct py_txn *)txn)->mutations += (int)(done ? done : 1);
    result = Py_BuildValue("(ni)", done, rc);
end:
    PyMem_RawFree(rows);
    PyMem_RawFree(stored);
    PyMem_RawFree(buffer);
    PyMem_RawFree(joined);
    Py_XDECREF(keep);
    Py_XDECREF(keys);
    Py_XDECREF(values);
    return result;
}

static PyMethodDef methods[] = {
    {"bind", bind, METH_VARARGS, "Bind to py-lmdb's loaded module (path, Transaction, Environment)."},
    {"put_run", put_run, METH_VARARGS, "Put prefix + keys[i] -> values[i] with the GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_lmdb_bulk",
    .m_doc = "GIL-free bulk puts into py-lmdb transactions.",
    .m_size = -1,
    .m_methods = methods,
};

/* The calling convention of this build (bind, put_run): `gil_free` uses a module only of
   the convention it was written for, so a build left over from an older source (say, a
   checkout updated without `make`) falls back to putmulti instead of failing its calls. */
#define INTERFACE 2

PyMODINIT_FUNC
PyInit__lmdb_bulk(void)
{
    PyObject *made = PyModule_Create(&module);
    if (made != NULL && PyModule_AddIntConstant(made, "INTERFACE", INTERFACE) < 0) {
        Py_DECREF(made);
        return NULL;
    }
    return made;
}
