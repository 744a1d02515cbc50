// vcsim for virtrigaud's tests: the govmomi simulator (Debian's golang-github-vmware-govmomi-dev,
// govmomi 0.24, which ships the library but no vcsim command) with a vCenter model, TLS with a
// certificate of our own (so the tests know its SHA-256 thumbprint), fixed credentials, bound to
// 127.0.0.1.
//
// One addition: the simulator's NFC upload handler discards what it receives. With -nfc-dir,
// every NFC PUT/POST body is also written to DIR/<lease>-<file> on its way to that handler, so a
// test can compare what an NFC import sent with its source.
//
// A second one, for tests of task deadlines: the simulator runs every task to its end before
// it answers. With -task-delay METHOD=DURATION[,…], the task that METHOD returns shows
// state "running" (no result, no error) for DURATION after the call answered, then its real
// outcome. CancelTask on such a task while it "runs" ends it as vSphere ends a cancelled task:
// state "error", fault RequestCanceled (the work itself was already done by the simulator).
// CancelTask on any other task goes to the simulator (which has no CancelTask: a fault).
//
// A third one: the simulator's /folder (datastore HTTP) handler ignores the session cookie. Here a
// /folder request whose vmware_soap_session cookie is not a live session (and that has no HTTP
// Basic credentials of the login user) is answered 401, as vCenter and ESXi answer it (the check asks the simulator itself: a CurrentTime call with the
// same cookie). The wrapper also counts the GETs in flight per /folder path and keeps the
// highest count: GET /vrg/folder-inflight?path=/folder/DIR/FILE answers it as a decimal number
// (0 for a path never read), so a test can see how many ranged reads ran at once.
//
// Usage: vcsim -listen 127.0.0.1:8989 -cert c.pem -key k.pem -user U -pass P [-nfc-dir DIR]
// [-task-delay PowerOnVM_Task=30s]
// Prints "URL=https://127.0.0.1:8989/sdk" once it serves; exits on SIGTERM/SIGINT, removing the
// model's temporary datastore directories.
package main

import (
	"bytes"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "TLS certificate (PEM)")
	keyFile := flag.String("key", "", "TLS key (PEM)")
	user := flag.String("user", "user", "login user")
	pass := flag.String("pass", "pass", "login password")
	nfcDir := flag.String("nfc-dir", "", "keep NFC upload bodies in this directory")
	taskDelay := flag.String("task-delay", "", "METHOD=DURATION[,...]: the task of METHOD shows running that long")
	flag.Parse()
	delays := map[string]time.Duration{}
	for _, item := range strings.Split(*taskDelay, ",") {
		if item == "" {
			continue
		}
		kv := strings.SplitN(item, "=", 2)
		if len(kv) != 2 {
			log.Fatalf("-task-delay: %q is not METHOD=DURATION", item)
		}
		d, err := time.ParseDuration(kv[1])
		if err != nil {
			log.Fatalf("-task-delay: %v", err)
		}
		delays[kv[0]] = d
	}

	model := simulator.VPX()
	model.Datastore = 1
	if err := model.Create(); err != nil {
		log.Fatalf("create model: %v", err)
	}
	defer model.Remove()

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatalf("load TLS key pair: %v", err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}

	server := model.Service.NewServer()
	defer server.Close()
	simulatorHandler := server.Config.Handler
	if *nfcDir != "" {
		inner := server.Config.Handler
		server.Config.Handler = keepNFC(inner, *nfcDir)
	}
	if len(delays) > 0 {
		server.Config.Handler = delayTasks(server.Config.Handler, delays)
	}
	server.Config.Handler = guardFolder(server.Config.Handler, simulatorHandler, *user, *pass)
	u := *server.URL
	u.User = nil
	fmt.Printf("URL=%s\n", u.String())
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

// keepNFC tees the body of every NFC upload into dir before the simulator's handler discards it.
func keepNFC(inner http.Handler, dir string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/nfc/") && (r.Method == http.MethodPost || r.Method == http.MethodPut) {
			p := strings.Split(r.URL.Path, "/")
			if len(p) >= 2 {
				name := p[len(p)-2] + "-" + filepath.Base(p[len(p)-1])
				f, err := os.Create(filepath.Join(dir, name+".part"))
				if err == nil {
					body := r.Body
					r.Body = struct {
						io.Reader
						io.Closer
					}{io.TeeReader(body, f), body}
					inner.ServeHTTP(w, r)
					_ = f.Close()
					_ = os.Rename(filepath.Join(dir, name+".part"), filepath.Join(dir, name))
					return
				}
				log.Printf("keep NFC body: %v", err)
			}
		}
		inner.ServeHTTP(w, r)
	})
}

var (
	soapMethod = regexp.MustCompile(`<(?:[\w-]+:)?Body[^>]*>\s*<(?:[\w-]+:)?(\w+)`)
	soapThis   = regexp.MustCompile(`<(?:[\w-]+:)?_this[^>]*>([^<]+)<`)
	soapReturn = regexp.MustCompile(`<(?:[\w-]+:)?returnval[^>]*>([^<]+)<`)
)

// delayTasks makes the tasks of the methods in delays show "running" for their delay, and
// answers CancelTask for them while they do (see the file comment).
func delayTasks(inner http.Handler, delays map[string]time.Duration) http.Handler {
	var mu sync.Mutex
	pending := map[string]chan struct{}{}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasPrefix(r.URL.Path, "/sdk") {
			inner.ServeHTTP(w, r)
			return
		}
		body, err := ioutil.ReadAll(r.Body)
		_ = r.Body.Close()
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		r.Body = ioutil.NopCloser(bytes.NewReader(body))
		m := soapMethod.FindSubmatch(body)
		if m == nil {
			inner.ServeHTTP(w, r)
			return
		}
		method := string(m[1])
		if method == "CancelTask" {
			if t := soapThis.FindSubmatch(body); t != nil {
				id := string(t[1])
				mu.Lock()
				stop, ok := pending[id]
				delete(pending, id)
				mu.Unlock()
				if ok {
					close(stop)
					setTask(id, types.TaskInfoStateError, nil, &types.LocalizedMethodFault{
						Fault:            &types.RequestCanceled{},
						LocalizedMessage: "The task was canceled by a user.",
					})
					log.Printf("task-delay: %s cancelled", id)
					w.Header().Set("Content-Type", "text/xml; charset=utf-8")
					fmt.Fprint(w, `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><CancelTaskResponse xmlns="urn:vim25"></CancelTaskResponse></soapenv:Body></soapenv:Envelope>`)
					return
				}
			}
			inner.ServeHTTP(w, r)
			return
		}
		delay, ok := delays[method]
		if !ok {
			inner.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		inner.ServeHTTP(rec, r)
		if rv := soapReturn.FindSubmatch(rec.Body.Bytes()); rv != nil {
			id := string(rv[1])
			ref := types.ManagedObjectReference{Type: "Task", Value: id}
			if task, ok := simulator.Map.Get(ref).(*simulator.Task); ok {
				var final types.TaskInfo
				simulator.Map.WithLock(task, func() { final = task.Info })
				setTask(id, types.TaskInfoStateRunning, nil, nil)
				stop := make(chan struct{})
				mu.Lock()
				pending[id] = stop
				mu.Unlock()
				log.Printf("task-delay: %s (%s) shows running for %v", id, method, delay)
				go func() {
					select {
					case <-stop:
					case <-time.After(delay):
						mu.Lock()
						delete(pending, id)
						mu.Unlock()
						setTask(id, final.State, final.Result, final.Error)
					}
				}()
			}
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(rec.Body.Bytes())
	})
}

// setTask sets the outcome fields of task id's info.
func setTask(id string, state types.TaskInfoState, result types.AnyType, fault *types.LocalizedMethodFault) {
	ref := types.ManagedObjectReference{Type: "Task", Value: id}
	task, ok := simulator.Map.Get(ref).(*simulator.Task)
	if !ok {
		return
	}
	simulator.Map.WithLock(task, func() {
		task.Info.State = state
		task.Info.Result = result
		task.Info.Error = fault
	})
}

const currentTimeProbe = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>
</soapenv:Body></soapenv:Envelope>`

// liveSession tells whether the session cookie of r names a live simulator session, by asking
// the simulator (sim) for CurrentTime with that cookie: without a session it faults
// NotAuthenticated.
func liveSession(sim http.Handler, r *http.Request) bool {
	c, err := r.Cookie("vmware_soap_session")
	if err != nil || c.Value == "" {
		return false
	}
	probe := httptest.NewRequest(http.MethodPost, "/sdk", strings.NewReader(currentTimeProbe))
	probe.Header.Set("Content-Type", "text/xml; charset=utf-8")
	probe.Header.Set("SOAPAction", "urn:vim25/6.5")
	probe.AddCookie(&http.Cookie{Name: "vmware_soap_session", Value: c.Value})
	rec := httptest.NewRecorder()
	sim.ServeHTTP(rec, probe)
	return rec.Code == http.StatusOK && !bytes.Contains(rec.Body.Bytes(), []byte("NotAuthenticated"))
}

// guardFolder answers 401 to /folder requests without a live session and keeps the highest
// number of GETs in flight per /folder path (see the file comment).
func guardFolder(inner http.Handler, sim http.Handler, user, pass string) http.Handler {
	var mu sync.Mutex
	inflight := map[string]int{}
	highest := map[string]int{}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/vrg/folder-inflight" {
			mu.Lock()
			n := highest[r.URL.Query().Get("path")]
			mu.Unlock()
			fmt.Fprintf(w, "%d", n)
			return
		}
		if !strings.HasPrefix(r.URL.Path, "/folder") {
			inner.ServeHTTP(w, r)
			return
		}
		if u, pw, ok := r.BasicAuth(); !(ok && u == user && pw == pass) && !liveSession(sim, r) {
			log.Printf("folder: %s %s without a live session: 401", r.Method, r.URL.Path)
			http.Error(w, "not authenticated", http.StatusUnauthorized)
			return
		}
		if r.Method != http.MethodGet {
			inner.ServeHTTP(w, r)
			return
		}
		key := r.URL.Path
		mu.Lock()
		inflight[key]++
		if inflight[key] > highest[key] {
			highest[key] = inflight[key]
		}
		mu.Unlock()
		defer func() {
			mu.Lock()
			inflight[key]--
			mu.Unlock()
		}()
		inner.ServeHTTP(w, r)
	})
}
