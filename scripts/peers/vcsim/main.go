// vcsim for virtrigaud's tests: the govmomi simulator (Debian's golang-github-vmware-govmomi-dev,
// govmomi 0.24, which ships the library but no vcsim command) with a vCenter model, TLS with a
// certificate of our own (so the tests know its SHA-256 thumbprint), fixed credentials, bound to
// 127.0.0.1.
//
// One addition: the simulator's NFC upload handler discards what it receives. With -nfc-dir,
// every NFC PUT/POST body is also written to DIR/<lease>-<file> on its way to that handler, so a
// test can compare what an NFC import sent with its source.
//
// Usage: vcsim -listen 127.0.0.1:8989 -cert c.pem -key k.pem -user U -pass P [-nfc-dir DIR]
// Prints "URL=https://127.0.0.1:8989/sdk" once it serves; exits on SIGTERM/SIGINT, removing the
// model's temporary datastore directories.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "TLS certificate (PEM)")
	keyFile := flag.String("key", "", "TLS key (PEM)")
	user := flag.String("user", "user", "login user")
	pass := flag.String("pass", "pass", "login password")
	nfcDir := flag.String("nfc-dir", "", "keep NFC upload bodies in this directory")
	flag.Parse()

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
