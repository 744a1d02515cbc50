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
	if *nfcDir != "" {
		inner := server.Config.Handler
		server.Config.Handler = keepNFC(inner, *nfcDir)
	}
	if len(delays) > 0 {
		server.Config.Handler = delayTasks(server.Config.Handler, delays)
	}
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
