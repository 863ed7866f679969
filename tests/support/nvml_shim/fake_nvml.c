/*
 * fake_nvml.c - a fake NVIDIA Management Library (libnvidia-ml.so.1), tests only.
 *
 * aitbc-miner reaches NVML through pynvml (nvidia-ml-py), a ctypes binding that
 * does CDLL("libnvidia-ml.so.1") and calls C symbols by name. This library
 * stands in for the driver's one, so the real pynvml code runs in the tests:
 * symbol names (including versioned ones such as ..._v2 and ..._v3), struct
 * layouts, return codes and the string buffers all go through ctypes for real.
 * Build (tests/support/nvml_shim/__init__.py does this):
 *
 *     cc -shared -fPIC -O2 -pthread [-DAITBC_NO_V3] -o DIR/libnvidia-ml.so.1 fake_nvml.c
 *
 * Two variants (nvml_shim.build(..., legacy=True) builds the second), like two driver
 * generations:
 *
 *   default           an R510+ driver: exports nvmlDeviceGetComputeRunningProcesses_v3
 *                     (what pynvml's unversioned call uses) and, as those drivers
 *                     still do, ..._v2.
 *   -DAITBC_NO_V3     a pre-R510 driver such as R470: ..._v2 only, no ..._v3, so
 *                     pynvml.nvmlDeviceGetComputeRunningProcesses raises
 *                     NVMLLibraryMismatchError (NVMLError_FunctionNotFound inside)
 *                     and only pynvml.nvmlDeviceGetComputeRunningProcesses_v2 works.
 *
 * It implements only the symbols pynvml calls on behalf of aitbc_miner/gpu.py:
 *
 *     nvmlInitWithFlags                  (pynvml.nvmlInit)
 *     nvmlShutdown, nvmlErrorString
 *     nvmlSystemGetDriverVersion, nvmlSystemGetCudaDriverVersion
 *     nvmlDeviceGetCount_v2              (pynvml.nvmlDeviceGetCount)
 *     nvmlDeviceGetHandleByIndex_v2      (pynvml.nvmlDeviceGetHandleByIndex)
 *     nvmlDeviceGetHandleByUUID
 *     nvmlDeviceGetUUID, nvmlDeviceGetName
 *     nvmlDeviceGetMemoryInfo            (pynvml's default, version=None: nvmlMemory_t)
 *     nvmlDeviceGetUtilizationRates
 *     nvmlDeviceGetPciInfo_v3            (pynvml.nvmlDeviceGetPciInfo)
 *     nvmlDeviceGetTemperature
 *     nvmlDeviceGetMigMode
 *     nvmlDeviceGetNumaNodeId
 *     nvmlDeviceGetComputeRunningProcesses_v3   (pynvml.nvmlDeviceGetComputeRunningProcesses;
 *                                               not in the -DAITBC_NO_V3 variant)
 *     nvmlDeviceGetComputeRunningProcesses_v2   (pynvml.nvmlDeviceGetComputeRunningProcesses_v2)
 *     nvmlDeviceGetTopologyCommonAncestor
 *
 * Any other symbol is missing on purpose: pynvml then raises
 * NVMLError_FunctionNotFound, which is what a test should see if the daemon
 * starts calling something new (extend this file then). One extra, non-NVML
 * symbol, aitbcFakeNvmlReset(), lets an in-process test start from scratch.
 *
 * The inventory comes from the file named by $AITBC_FAKE_NVML_CONFIG. It is
 * re-read whenever it changes (replace it atomically), so a test can make a GPU
 * fall off the bus or come back while the code under test keeps its handles.
 * No variable or an unreadable file before the first load: the driver is "not
 * loaded". If $AITBC_FAKE_NVML_TRACE names a file, each call appends its
 * symbol name there, one per line.
 *
 * Config format: one "key value" per line; a line starting with '#' is a
 * comment (no trailing comments: a value is the rest of its line, so names may
 * hold spaces). Error values are NVML names without NVML_ERROR_ (GPU_IS_LOST,
 * DRIVER_NOT_LOADED, UNKNOWN, ...) or numbers; NONE or 0 is success.
 *
 *     init_error DRIVER_NOT_LOADED   nvmlInit fails with this
 *     system_error UNKNOWN           count, driver and CUDA version queries fail
 *     driver 550.54.15               nvmlSystemGetDriverVersion
 *     cuda 12040                     nvmlSystemGetCudaDriverVersion (1000*major + 10*minor)
 *     topology 0 1 10                common ancestor of GPUs 0 and 1 (NVML level);
 *                                    pairs not listed answer NOT_SUPPORTED
 *     gpu                            starts a device; the keys below describe it
 *     uuid GPU-...                   (at most 95 characters, like name)
 *     name NVIDIA H100 80GB HBM3
 *     total_mb 81920
 *     used_mb 1024                   used by nobody listed; listed processes add theirs
 *     util 90                        utilization rates: gpu %
 *     mem_util 20                    utilization rates: memory %
 *     temp 41 | none                 left out or none: NOT_SUPPORTED
 *     pci 00000000:01:00.0           domain:bus:device.function, hex
 *     pci_device_id 0x233010DE
 *     numa 0                         left out: NOT_SUPPORTED
 *     mig 1 [0] | none               current [pending] MIG mode (1: enabled);
 *                                    left out or none: NOT_SUPPORTED (no MIG)
 *     error GPU_IS_LOST              every call on the device fails, handle lookups too
 *     query_error GPU_IS_LOST        handle lookups work, every other device call fails
 *     processes_error NO_PERMISSION  only the compute process listing (_v3 and _v2) fails
 *                                    (as on a MIG-mode GPU for an unprivileged caller)
 *     process 4242 20000             compute process: pid, used MiB ("na": not available)
 *     process_live 4243 700          the same, listed only while the pid is alive
 *                                    (a zombie is gone: a driver frees memory at exit)
 */

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

/* -- NVML's C types (nvml.h), as pynvml's ctypes declarations mirror them -------- */

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_UNKNOWN = 999,
};

#define NVML_VALUE_NOT_AVAILABLE_ULL (~0ULL)
#define NVML_VALUE_NOT_AVAILABLE_UINT 0xFFFFFFFFu
#define NVML_TEMPERATURE_GPU 0u
#define NVML_TOPOLOGY_INTERNAL 0u

/* pynvml: c_nvmlMemory_t */
typedef struct {
    unsigned long long total;
    unsigned long long free;
    unsigned long long used;
} nvmlMemory_t;

/* pynvml: c_nvmlUtilization_t */
typedef struct {
    unsigned int gpu;
    unsigned int memory;
} nvmlUtilization_t;

/* pynvml: nvmlPciInfo_t (the v3 layout: busIdLegacy[16] first, busId[32] last) */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

/* pynvml: c_nvmlProcessInfo_v2_t, which c_nvmlProcessInfo_v3_t aliases: the _v2 and
 * _v3 listings fill the same 24-byte entries. 4 bytes of padding after pid. */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_v2_t;

typedef nvmlProcessInfo_v2_t nvmlProcessInfo_t;

_Static_assert(sizeof(nvmlMemory_t) == 24, "nvmlMemory_t layout");
_Static_assert(sizeof(nvmlUtilization_t) == 8, "nvmlUtilization_t layout");
_Static_assert(sizeof(nvmlPciInfo_t) == 68, "nvmlPciInfo_t layout");
_Static_assert(sizeof(nvmlProcessInfo_v2_t) == 24, "nvmlProcessInfo_v2_t layout");
_Static_assert(offsetof(nvmlProcessInfo_v2_t, usedGpuMemory) == 8, "nvmlProcessInfo_v2_t layout");

/* -- the inventory --------------------------------------------------------------- */

#define MAX_GPUS 16
#define MAX_PROCS 32
#define MAX_LINKS 128
#define TEXT_SIZE 96 /* NVML_DEVICE_UUID_V2_BUFFER_SIZE, NVML_DEVICE_NAME_V2_BUFFER_SIZE */
#define MIB (1024ULL * 1024ULL)

struct fake_process {
    unsigned int pid;
    unsigned long long used_bytes; /* NVML_VALUE_NOT_AVAILABLE_ULL for "na" */
    int live_only;                 /* process_live: listed only while the pid is alive */
};

struct fake_gpu {
    char uuid[TEXT_SIZE];
    char name[TEXT_SIZE];
    unsigned long long total_mb, used_mb;
    unsigned int util, mem_util;
    int has_temp, temp;
    unsigned int pci_domain, pci_bus, pci_device, pci_function, pci_device_id;
    int has_numa, numa;
    int has_mig;
    unsigned int mig_current, mig_pending;
    nvmlReturn_t error;       /* every device call, handle lookups included */
    nvmlReturn_t query_error; /* every device call except handle lookups */
    nvmlReturn_t processes_error; /* nvmlDeviceGetComputeRunningProcesses_v3/_v2 only */
    int nprocs;
    struct fake_process procs[MAX_PROCS];
};

struct fake_link {
    unsigned int a, b, level;
};

struct fake_config {
    nvmlReturn_t init_error, system_error;
    char driver[80]; /* NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE */
    int cuda;
    int ngpus;
    struct fake_gpu gpus[MAX_GPUS];
    int nlinks;
    struct fake_link links[MAX_LINKS];
};

/* A device handle (nvmlDevice_t) is a pointer into cfg.gpus; it stays valid when
 * the file is re-read, as a real handle does while the driver stays loaded. */
typedef struct fake_gpu *nvmlDevice_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; /* guards everything below */
static struct fake_config cfg;                            /* the inventory in force */
static struct fake_config parsed;                         /* scratch for a re-read */
static int cfg_loaded;
static struct stat cfg_stat; /* of the file cfg came from: re-read when it differs */
static unsigned int init_count; /* nvmlInit minus nvmlShutdown calls, like NVML's */

static const struct {
    nvmlReturn_t code;
    const char *name;
    const char *text;
} errors[] = {
    {0, "SUCCESS", "Success"},
    {1, "UNINITIALIZED", "Uninitialized"},
    {2, "INVALID_ARGUMENT", "Invalid Argument"},
    {3, "NOT_SUPPORTED", "Not Supported"},
    {4, "NO_PERMISSION", "Insufficient Permissions"},
    {5, "ALREADY_INITIALIZED", "Already Initialized"},
    {6, "NOT_FOUND", "Not Found"},
    {7, "INSUFFICIENT_SIZE", "Insufficient Size"},
    {8, "INSUFFICIENT_POWER", "Insufficient External Power"},
    {9, "DRIVER_NOT_LOADED", "Driver Not Loaded"},
    {10, "TIMEOUT", "Timeout"},
    {11, "IRQ_ISSUE", "Interrupt Request Issue"},
    {12, "LIBRARY_NOT_FOUND", "NVML Shared Library Not Found"},
    {13, "FUNCTION_NOT_FOUND", "Function Not Found"},
    {14, "CORRUPTED_INFOROM", "Corrupted infoROM"},
    {15, "GPU_IS_LOST", "GPU is lost"},
    {16, "RESET_REQUIRED", "GPU requires restart"},
    {17, "OPERATING_SYSTEM", "The operating system has blocked the request."},
    {18, "LIB_RM_VERSION_MISMATCH", "RM has detected an NVML/RM version mismatch."},
    {19, "IN_USE", "In use by another client"},
    {20, "MEMORY", "Insufficient Memory"},
    {21, "NO_DATA", "No data"},
    {999, "UNKNOWN", "Unknown Error"},
};

/* -- config file --------------------------------------------------------------- */

static int parse_error_code(const char *value, nvmlReturn_t *out)
{
    char *end;
    long number = strtol(value, &end, 10);
    if (*value && !*end) {
        *out = (nvmlReturn_t)number;
        return 0;
    }
    if (strcasecmp(value, "none") == 0) {
        *out = NVML_SUCCESS;
        return 0;
    }
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++) {
        if (strcasecmp(value, errors[i].name) == 0) {
            *out = errors[i].code;
            return 0;
        }
    }
    return -1;
}

static int parse_ull(const char *value, unsigned long long *out)
{
    char *end;
    if (!*value || *value == '-')
        return -1;
    *out = strtoull(value, &end, 0); /* base 0: 0x... is hex */
    return *end ? -1 : 0;
}

static int parse_uint(const char *value, unsigned int *out)
{
    unsigned long long v;
    if (parse_ull(value, &v) || v > 0xFFFFFFFFull)
        return -1;
    *out = (unsigned int)v;
    return 0;
}

static int parse_int(const char *value, int *out)
{
    char *end;
    long v = strtol(value, &end, 10);
    if (!*value || *end)
        return -1;
    *out = (int)v;
    return 0;
}

static int copy_value(char *dst, size_t size, const char *value)
{
    if (strlen(value) >= size)
        return -1;
    strcpy(dst, value);
    return 0;
}

/* One "key value" line into c (gpu: the device being described, or NULL). */
static const char *parse_line(struct fake_config *c, struct fake_gpu **gpu, const char *key,
                              const char *value)
{
    struct fake_gpu *g = *gpu;

    if (strcmp(key, "gpu") == 0) {
        if (c->ngpus == MAX_GPUS)
            return "too many gpus";
        *gpu = &c->gpus[c->ngpus++];
        return NULL;
    }
    if (strcmp(key, "init_error") == 0)
        return parse_error_code(value, &c->init_error) ? "bad error name" : NULL;
    if (strcmp(key, "system_error") == 0)
        return parse_error_code(value, &c->system_error) ? "bad error name" : NULL;
    if (strcmp(key, "driver") == 0)
        return copy_value(c->driver, sizeof c->driver, value) ? "driver too long" : NULL;
    if (strcmp(key, "cuda") == 0)
        return parse_int(value, &c->cuda) ? "bad cuda version" : NULL;
    if (strcmp(key, "topology") == 0) {
        struct fake_link *l = &c->links[c->nlinks];
        if (c->nlinks == MAX_LINKS)
            return "too many topology lines";
        if (sscanf(value, "%u %u %u", &l->a, &l->b, &l->level) != 3)
            return "topology wants: INDEX INDEX LEVEL";
        c->nlinks++;
        return NULL;
    }

    if (g == NULL)
        return "device key before any 'gpu' line (or unknown key)";
    if (strcmp(key, "uuid") == 0)
        return copy_value(g->uuid, sizeof g->uuid, value) ? "uuid too long" : NULL;
    if (strcmp(key, "name") == 0)
        return copy_value(g->name, sizeof g->name, value) ? "name too long" : NULL;
    if (strcmp(key, "total_mb") == 0)
        return parse_ull(value, &g->total_mb) ? "bad number" : NULL;
    if (strcmp(key, "used_mb") == 0)
        return parse_ull(value, &g->used_mb) ? "bad number" : NULL;
    if (strcmp(key, "util") == 0)
        return parse_uint(value, &g->util) ? "bad number" : NULL;
    if (strcmp(key, "mem_util") == 0)
        return parse_uint(value, &g->mem_util) ? "bad number" : NULL;
    if (strcmp(key, "temp") == 0) {
        g->has_temp = strcasecmp(value, "none") != 0;
        return g->has_temp && parse_int(value, &g->temp) ? "bad number" : NULL;
    }
    if (strcmp(key, "pci") == 0) {
        int end = 0;
        if (sscanf(value, "%x:%x:%x.%x%n", &g->pci_domain, &g->pci_bus, &g->pci_device,
                   &g->pci_function, &end) != 4 || value[end])
            return "pci wants DOMAIN:BUS:DEVICE.FUNCTION in hex";
        return NULL;
    }
    if (strcmp(key, "pci_device_id") == 0)
        return parse_uint(value, &g->pci_device_id) ? "bad number" : NULL;
    if (strcmp(key, "numa") == 0) {
        g->has_numa = 1;
        return parse_int(value, &g->numa) ? "bad number" : NULL;
    }
    if (strcmp(key, "mig") == 0) {
        int n;
        if (strcasecmp(value, "none") == 0) {
            g->has_mig = 0;
            return NULL;
        }
        g->has_mig = 1;
        n = sscanf(value, "%u %u", &g->mig_current, &g->mig_pending);
        if (n == 1)
            g->mig_pending = g->mig_current;
        return n >= 1 ? NULL : "mig wants CURRENT [PENDING] or none";
    }
    if (strcmp(key, "error") == 0)
        return parse_error_code(value, &g->error) ? "bad error name" : NULL;
    if (strcmp(key, "query_error") == 0)
        return parse_error_code(value, &g->query_error) ? "bad error name" : NULL;
    if (strcmp(key, "processes_error") == 0)
        return parse_error_code(value, &g->processes_error) ? "bad error name" : NULL;
    if (strcmp(key, "process") == 0 || strcmp(key, "process_live") == 0) {
        struct fake_process *p = &g->procs[g->nprocs];
        char used[32];
        unsigned long long mb;
        if (g->nprocs == MAX_PROCS)
            return "too many processes";
        if (sscanf(value, "%u %31s", &p->pid, used) != 2)
            return "process wants: PID USED_MB";
        if (strcasecmp(used, "na") == 0)
            p->used_bytes = NVML_VALUE_NOT_AVAILABLE_ULL;
        else if (parse_ull(used, &mb) == 0)
            p->used_bytes = mb * MIB;
        else
            return "bad used MiB";
        p->live_only = strcmp(key, "process_live") == 0;
        g->nprocs++;
        return NULL;
    }
    return "unknown key";
}

/* Read the file into `parsed`: 0 on success, -1 if it does not parse (the reason
 * goes to stderr), -2 if it cannot be opened. */
static int parse_file(const char *path)
{
    struct fake_gpu *gpu = NULL;
    char line[512];
    int lineno = 0;
    FILE *f = fopen(path, "r");

    if (f == NULL)
        return -2;
    memset(&parsed, 0, sizeof parsed);
    strcpy(parsed.driver, "550.54.15");
    parsed.cuda = 12040;
    while (fgets(line, sizeof line, f) != NULL) {
        char *key = line, *value, *end;
        const char *problem;
        lineno++;
        key += strspn(key, " \t");
        end = key + strlen(key);
        while (end > key && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' ' ||
                             end[-1] == '\t'))
            *--end = '\0';
        if (*key == '\0' || *key == '#')
            continue;
        value = key + strcspn(key, " \t");
        if (*value) {
            *value++ = '\0';
            value += strspn(value, " \t");
        }
        problem = parse_line(&parsed, &gpu, key, value);
        if (problem != NULL) {
            fprintf(stderr, "fake_nvml: %s:%d: %s: %s\n", path, lineno, key, problem);
            fclose(f);
            return -1;
        }
    }
    fclose(f);
    return 0;
}

/* Follow $AITBC_FAKE_NVML_CONFIG: re-read it when it changed (other inode, size or
 * mtime). Keeps the last good inventory if the file vanishes; a file that does
 * not parse makes every call fail with UNKNOWN until it is fixed. */
static nvmlReturn_t refresh(void)
{
    const char *path = getenv("AITBC_FAKE_NVML_CONFIG");
    struct stat st;

    if (path == NULL || *path == '\0' || stat(path, &st) != 0)
        return cfg_loaded ? NVML_SUCCESS : NVML_ERROR_DRIVER_NOT_LOADED;
    if (cfg_loaded && st.st_ino == cfg_stat.st_ino && st.st_dev == cfg_stat.st_dev &&
        st.st_size == cfg_stat.st_size && st.st_mtim.tv_sec == cfg_stat.st_mtim.tv_sec &&
        st.st_mtim.tv_nsec == cfg_stat.st_mtim.tv_nsec)
        return NVML_SUCCESS;
    switch (parse_file(path)) {
    case 0:
        break;
    case -1:
        return NVML_ERROR_UNKNOWN;
    default: /* vanished between stat and open */
        return cfg_loaded ? NVML_SUCCESS : NVML_ERROR_DRIVER_NOT_LOADED;
    }
    cfg = parsed;
    cfg_stat = st;
    cfg_loaded = 1;
    return NVML_SUCCESS;
}

static void trace(const char *fn)
{
    const char *path = getenv("AITBC_FAKE_NVML_TRACE");
    FILE *f;
    if (path == NULL || *path == '\0' || (f = fopen(path, "a")) == NULL)
        return;
    fprintf(f, "%s\n", fn);
    fclose(f);
}

/* Every entry point: take the lock, record the call, check nvmlInit, follow the file.
 * Pair with leave(), which drops the lock and passes the result through. */
static nvmlReturn_t enter(const char *fn)
{
    pthread_mutex_lock(&lock);
    trace(fn);
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    return refresh();
}

static nvmlReturn_t leave(nvmlReturn_t rc)
{
    pthread_mutex_unlock(&lock);
    return rc;
}

/* The device behind a handle; `query`: also apply the device's query_error. */
static nvmlReturn_t device(nvmlDevice_t handle, int query, struct fake_gpu **out)
{
    uintptr_t h = (uintptr_t)handle, first = (uintptr_t)&cfg.gpus[0];
    if (h < first || h >= (uintptr_t)&cfg.gpus[cfg.ngpus] || (h - first) % sizeof cfg.gpus[0])
        return NVML_ERROR_INVALID_ARGUMENT;
    if (handle->error != NVML_SUCCESS)
        return handle->error;
    if (query && handle->query_error != NVML_SUCCESS)
        return handle->query_error;
    *out = handle;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_text(char *dst, unsigned int length, const char *src)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(dst, src);
    return NVML_SUCCESS;
}

/* Alive and not a zombie: field 3 of /proc/<pid>/stat, after the ")" of the name. */
static int alive(unsigned int pid)
{
    char path[64], buf[512], *paren;
    size_t n;
    FILE *f;
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    if ((f = fopen(path, "r")) == NULL)
        return 0;
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    paren = strrchr(buf, ')');
    return paren != NULL && paren[1] == ' ' && paren[2] != 'Z' && paren[2] != 'X' &&
           paren[2] != '\0';
}

/* The processes NVML would list on g now (copied into out, at most MAX_PROCS). */
static unsigned int listed_processes(const struct fake_gpu *g, struct fake_process *out)
{
    unsigned int n = 0;
    for (int i = 0; i < g->nprocs; i++)
        if (!g->procs[i].live_only || alive(g->procs[i].pid))
            out[n++] = g->procs[i];
    return n;
}

/* -- the NVML API --------------------------------------------------------------- */

const char *nvmlErrorString(nvmlReturn_t result)
{
    for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
        if (errors[i].code == result)
            return errors[i].text;
    return "Unknown Error";
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    nvmlReturn_t rc;
    (void)flags;
    pthread_mutex_lock(&lock);
    trace(__func__);
    rc = refresh();
    if (rc == NVML_SUCCESS)
        rc = cfg.init_error;
    if (rc == NVML_SUCCESS)
        init_count++;
    return leave(rc);
}

nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t rc = enter(__func__);
    if (rc != NVML_ERROR_UNINITIALIZED) {
        init_count--;
        rc = NVML_SUCCESS;
    }
    return leave(rc);
}

/* Not NVML: forget every nvmlInit and the loaded file (in-process tests only). */
void aitbcFakeNvmlReset(void)
{
    pthread_mutex_lock(&lock);
    init_count = 0;
    cfg_loaded = 0;
    memset(&cfg, 0, sizeof cfg);
    memset(&cfg_stat, 0, sizeof cfg_stat);
    pthread_mutex_unlock(&lock);
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = cfg.system_error;
    if (rc == NVML_SUCCESS)
        rc = copy_text(version, length, cfg.driver);
    return leave(rc);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = cfg.system_error;
    if (rc == NVML_SUCCESS && cudaDriverVersion == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *cudaDriverVersion = cfg.cuda;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = cfg.system_error;
    if (rc == NVML_SUCCESS && deviceCount == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        *deviceCount = (unsigned int)cfg.ngpus;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS && (device == NULL || index >= (unsigned int)cfg.ngpus))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        rc = cfg.gpus[index].error;
    if (rc == NVML_SUCCESS)
        *device = &cfg.gpus[index];
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    nvmlReturn_t rc = enter(__func__);
    int i = 0;
    if (rc == NVML_SUCCESS && (uuid == NULL || device == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    while (rc == NVML_SUCCESS && i < cfg.ngpus && strcmp(cfg.gpus[i].uuid, uuid) != 0)
        i++;
    if (rc == NVML_SUCCESS && i == cfg.ngpus)
        rc = NVML_ERROR_NOT_FOUND;
    if (rc == NVML_SUCCESS)
        rc = cfg.gpus[i].error;
    if (rc == NVML_SUCCESS)
        *device = &cfg.gpus[i];
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t handle, char *uuid, unsigned int length)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 0, &g);
    if (rc == NVML_SUCCESS)
        rc = copy_text(uuid, length, g->uuid);
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t handle, char *name, unsigned int length)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS)
        rc = copy_text(name, length, g->name);
    return leave(rc);
}

/* used = used_mb plus what the listed processes hold, capped at total. */
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t handle, nvmlMemory_t *memory)
{
    struct fake_process procs[MAX_PROCS];
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS && memory == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        unsigned long long total = g->total_mb * MIB, used = g->used_mb * MIB;
        unsigned int n = listed_processes(g, procs);
        for (unsigned int i = 0; i < n; i++)
            if (procs[i].used_bytes != NVML_VALUE_NOT_AVAILABLE_ULL)
                used += procs[i].used_bytes;
        if (used > total)
            used = total;
        memory->total = total;
        memory->used = used;
        memory->free = total - used;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t handle, nvmlUtilization_t *utilization)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS && utilization == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        utilization->gpu = g->util;
        utilization->memory = g->mem_util;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t handle, nvmlPciInfo_t *pci)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS && pci == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        memset(pci, 0, sizeof *pci);
        /* NVML_DEVICE_PCI_BUS_ID_LEGACY_FMT and NVML_DEVICE_PCI_BUS_ID_FMT */
        snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%04X:%02X:%02X.%X",
                 g->pci_domain & 0xFFFF, g->pci_bus, g->pci_device, g->pci_function);
        snprintf(pci->busId, sizeof pci->busId, "%08X:%02X:%02X.%X", g->pci_domain, g->pci_bus,
                 g->pci_device, g->pci_function);
        pci->domain = g->pci_domain;
        pci->bus = g->pci_bus;
        pci->device = g->pci_device;
        pci->pciDeviceId = g->pci_device_id;
        pci->pciSubSystemId = 0;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t handle, unsigned int sensorType,
                                      unsigned int *temp)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS && (temp == NULL || sensorType != NVML_TEMPERATURE_GPU))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && !g->has_temp)
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS)
        *temp = (unsigned int)g->temp;
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t handle, unsigned int *currentMode,
                                  unsigned int *pendingMode)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS && (currentMode == NULL || pendingMode == NULL))
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && !g->has_mig)
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS) {
        *currentMode = g->mig_current;
        *pendingMode = g->mig_pending;
    }
    return leave(rc);
}

nvmlReturn_t nvmlDeviceGetNumaNodeId(nvmlDevice_t handle, int *node)
{
    struct fake_gpu *g;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS && node == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS && !g->has_numa)
        rc = NVML_ERROR_NOT_SUPPORTED;
    if (rc == NVML_SUCCESS)
        *node = g->numa;
    return leave(rc);
}

/* Both listings; fn: the symbol called, for the trace. NVML's two-call protocol: with
 * too small a buffer (or none), set *infoCount to the number needed and answer
 * INSUFFICIENT_SIZE, or SUCCESS when there is nothing to list. */
static nvmlReturn_t running_processes(const char *fn, nvmlDevice_t handle,
                                      unsigned int *infoCount, nvmlProcessInfo_v2_t *infos)
{
    struct fake_process procs[MAX_PROCS];
    struct fake_gpu *g;
    unsigned int n = 0;
    nvmlReturn_t rc = enter(fn);
    if (rc == NVML_SUCCESS)
        rc = device(handle, 1, &g);
    if (rc == NVML_SUCCESS)
        rc = g->processes_error;
    if (rc == NVML_SUCCESS && infoCount == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS)
        n = listed_processes(g, procs);
    if (rc == NVML_SUCCESS && (infos == NULL || *infoCount < n)) {
        *infoCount = n;
        rc = n == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
        return leave(rc);
    }
    if (rc == NVML_SUCCESS) {
        for (unsigned int i = 0; i < n; i++) {
            infos[i].pid = procs[i].pid;
            infos[i].usedGpuMemory = procs[i].used_bytes;
            infos[i].gpuInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT; /* not a MIG instance */
            infos[i].computeInstanceId = NVML_VALUE_NOT_AVAILABLE_UINT;
        }
        *infoCount = n;
    }
    return leave(rc);
}

#ifndef AITBC_NO_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t handle, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    return running_processes(__func__, handle, infoCount, infos);
}
#endif

/* R470 and later (the only listing a pre-R510 driver has that pynvml can call). */
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t handle, unsigned int *infoCount,
                                                     nvmlProcessInfo_v2_t *infos)
{
    return running_processes(__func__, handle, infoCount, infos);
}

nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2,
                                                 unsigned int *pathInfo)
{
    struct fake_gpu *a, *b;
    nvmlReturn_t rc = enter(__func__);
    if (rc == NVML_SUCCESS)
        rc = device(device1, 1, &a);
    if (rc == NVML_SUCCESS)
        rc = device(device2, 1, &b);
    if (rc == NVML_SUCCESS && pathInfo == NULL)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc == NVML_SUCCESS) {
        unsigned int ia = (unsigned int)(a - cfg.gpus), ib = (unsigned int)(b - cfg.gpus);
        rc = NVML_ERROR_NOT_SUPPORTED;
        if (ia == ib) {
            *pathInfo = NVML_TOPOLOGY_INTERNAL;
            rc = NVML_SUCCESS;
        }
        for (int i = 0; rc != NVML_SUCCESS && i < cfg.nlinks; i++) {
            const struct fake_link *l = &cfg.links[i];
            if ((l->a == ia && l->b == ib) || (l->a == ib && l->b == ia)) {
                *pathInfo = l->level;
                rc = NVML_SUCCESS;
            }
        }
    }
    return leave(rc);
}
